"""The state layer every process shares: the store and what is written in it, and nothing of the engine.

  store.py     SQLite (WAL) in <workspace>/.nightlab/state.db: kv, events, commands, and the schema
  ledger.py    candidates, runs, experiments (written once), the loop's kv keys, the exports
  stats.py     run-to-run noise and gains in standard errors (the keep rule and the views share them)
  commands.py  the command registry: one spec per command, parsed once into a typed Command
  steering.py  sending a command (CLI, bots) and applying it (called by the engine at checkpoints)
  views.py     status / history / best / report texts
  config.py    TOML -> frozen Settings, secrets
  lock.py      one process per role and workspace (pid files under flock)
  errors.py    UserError: what a user can fix
  disk.py      the one walk of a folder's files and their sizes

bot/ and heartbeat/ read and write state only through here; importing it loads no engine module,
no executor and no psutil (tests/loop/test_layers.py holds that).
"""
