from __future__ import annotations

from pathlib import Path

import pytest
from nightlab.heartbeat.cli import main
from nightlab.loop.state.config import ConfigError, Redactor, Secret, load_settings, render_settings, resolve_secrets

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nightlab.toml"
    path.write_text(text)
    return path


def test_example_config_loads_and_is_offline() -> None:
    settings = load_settings(REPO / "config.example.toml")
    assert settings.data.source == "stdlib"
    assert settings.proposer.kind == "search"
    assert settings.telegram is None and settings.slack is None
    assert settings.heartbeat.run_timeout == 600.0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml")


def test_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[loop\nconfirm_k = 2\n")
    with pytest.raises(ConfigError, match=r"nightlab\.toml: TOML syntax error"):
        load_settings(path)


def test_a_byte_order_mark_is_not_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "nightlab.toml"
    path.write_bytes(b"\xef\xbb\xbf[loop]\r\nkeep_z = 2.5\r\n")  # as some Windows editors save it
    assert load_settings(path).loop.keep_z == 2.5


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service runs in the config's folder; `nightlab status --config F` typed elsewhere must
    find the same workspace and data, not make a second one under the shell's directory; and
    `nightlab run --config nightlab.toml` must not give runs a data dir relative to nothing."""
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", '[workspace]\npath = "ws"\n[data]\ncache_dir = "../cache"\n')
    monkeypatch.chdir(tmp_path)
    for config in (path, Path("conf/nightlab.toml")):  # the path as given, absolute or not
        settings = load_settings(config)
        assert settings.workspace_path == tmp_path / "conf" / "ws"
        # as is: runs get it from their own folder, the workspace (a relative one named nothing there)
        assert settings.cache_path == tmp_path / "cache"
    monkeypatch.setenv("NIGHTLAB_TEST_ROOT", str(tmp_path / "elsewhere"))
    absolute = load_settings(write(tmp_path / "conf", '[workspace]\npath = "$NIGHTLAB_TEST_ROOT/ws"\n'))
    assert absolute.workspace_path == tmp_path / "elsewhere" / "ws"


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[heartbeat]\nrun_timout = 60\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert "heartbeat.run_timout" in message and "run_timeout" in message


@pytest.mark.parametrize(("text", "said"), [
    # appended at the end of config.example.toml, a [loop] key lands in its last section
    ("[digest]\nmode = \"every\"\nmax_experiments = 3\n",
     "unknown key 'digest.max_experiments' in [digest]; it is a key of [loop]: move it under that header"),
    ("keep_z = 2.5\n[loop]\n", "unknown key 'keep_z' in the top level; it is a key of [loop]: move it under"),
    ("[proposer]\ncommand = \"claude\"\n", "it is a key of [proposer.agent]: move it under that header"),
    ("[loop]\nkind = \"agent\"\n", "it is a key of [proposer] or [executor]: move it under the one you meant"),
    ("[loop]\nkeep_zz = 2\n", "unknown key 'loop.keep_zz' in [loop]; did you mean 'keep_z'? (known keys: "),
    ("[loop]\nzzzz = 2\n", "unknown key 'loop.zzzz' in [loop]; remove it (known keys: "),
])
def test_an_unknown_key_says_what_was_meant(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert said in str(err.value) and len(str(err.value).splitlines()) == 1


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'telegarm'"):
        load_settings(write(tmp_path, "[telegarm]\n"))


def test_wrong_type_names_key_value_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, '[heartbeat]\nrun_timeout = "ten minutes"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "heartbeat.run_timeout = 'ten minutes'" in str(err.value)
    assert "expected a number" in str(err.value)


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.shards"):
        load_settings(write(tmp_path, "[data]\nshards = true\n"))


def test_bad_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'minimize', 'maximize'"):
        load_settings(write(tmp_path, '[project]\ndirection = "down"\n'))


@pytest.mark.parametrize("hours", ["22:00", "22-08", "22:00-22:00", "25:00-08:00", "22:00-8:0"])
def test_bad_run_hours_say_the_form(tmp_path: Path, hours: str) -> None:
    with pytest.raises(ConfigError, match=f"heartbeat.hours = '{hours}'.*e.g. \"22:00-08:00\""):
        load_settings(write(tmp_path, f'[heartbeat]\nhours = "{hours}"\n'))


def test_bad_list_item(tmp_path: Path) -> None:
    path = write(tmp_path, '[telegram]\noperators = ["alice"]\n')
    with pytest.raises(ConfigError, match=r"telegram.operators\[0\]"):
        load_settings(path)


@pytest.mark.parametrize(("line", "said"), [
    ("[executor]\ngpus = 0", "executor.gpus = 0: expected a list of integers; in brackets: gpus = [0]"),
    ('[slack]\nchannels = "C01"', "slack.channels = 'C01': expected a list of strings; in brackets: channels = [\"C01\"]"),
    ('[executor]\ngpus = "all"', "executor.gpus = 'all': expected a list of integers"),
])
def test_one_value_where_a_list_belongs_says_the_list(tmp_path: Path, line: str, said: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, line + "\n"))
    assert said in str(err.value)


def test_channels_deny_by_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="deny by default"):
        load_settings(write(tmp_path, "[telegram]\nchats = [1]\n"))


def test_missing_secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NIGHTLAB_TELEGRAM_TOKEN", raising=False)
    settings = load_settings(write(tmp_path, "[telegram]\noperators = [1]\n"))
    with pytest.raises(ConfigError, match="NIGHTLAB_TELEGRAM_TOKEN"):
        resolve_secrets(settings)


def test_every_missing_secret_is_named_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Telegram and Slack set up together: `config check` named only the first missing token, so
    each of the three took a fix and a check of its own."""
    for name in ("NIGHTLAB_TELEGRAM_TOKEN", "NIGHTLAB_SLACK_BOT_TOKEN", "NIGHTLAB_SLACK_APP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NIGHTLAB_SLACK_BOT_TOKEN", "xoxb-1-2-3")
    path = write(tmp_path, '[telegram]\noperators = [1]\n[slack]\noperators = ["U1"]\n')
    assert main(["config", "check", str(path)]) == 2
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 2 and "telegram.token.env = 'NIGHTLAB_TELEGRAM_TOKEN'" in said[0]
    assert said[1].startswith(f"{path}: slack.app_token.env = 'NIGHTLAB_SLACK_APP_TOKEN': the environment variable")


def test_secret_from_file_is_redacted(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("123:SECRET-TOKEN\n")
    path = write(tmp_path, f'[telegram]\noperators = [1]\ntoken = {{ file = "{token_file}" }}\n')
    settings = load_settings(path)
    secrets = resolve_secrets(settings)
    assert isinstance(secrets.telegram_token, Secret)
    assert secrets.telegram_token.reveal() == "123:SECRET-TOKEN"
    assert "SECRET" not in repr(secrets) and "SECRET" not in f"{secrets.telegram_token}"
    assert "SECRET" not in render_settings(settings)


@pytest.mark.parametrize("line", [
    "token = 'xoxb-1234-SECRET'",  # the token pasted in as a string
    "token = { env = 'xoxb-1234-SECRET' }",  # ... or as the variable's name
])
def test_a_secret_written_in_the_config_is_not_echoed(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, f"[telegram]\noperators = [1]\n{line}\n"))
    message = str(err.value)
    assert "SECRET" not in message and "xoxb" not in message
    assert "telegram.token" in message and "value not shown" in message
    assert 'token = { env = "VAR" }' in message and '{ file = "/path" }' in message


def test_a_secret_pasted_as_the_file_is_not_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "[telegram]\noperators = [1]\ntoken = { file = '123456:AAH-SECRET' }\n")
    with pytest.raises(ConfigError) as err:
        resolve_secrets(load_settings(path))
    assert str(err.value) == (f"{path}: telegram.token.file (not a path; value not shown): cannot read the secret"
                              " (No such file or directory); point it at a readable file"
                              " (e.g. $CREDENTIALS_DIRECTORY/telegram)")
    path = write(tmp_path, f"[telegram]\noperators = [1]\ntoken = {{ file = '{tmp_path}/absent' }}\n")
    with pytest.raises(ConfigError, match=f"telegram.token.file = '{tmp_path}/absent': cannot read"):
        resolve_secrets(load_settings(path))  # a path is shown: it is what to fix


def test_a_secret_file_under_an_unset_variable_says_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)  # outside the systemd service
    path = write(tmp_path, '[telegram]\noperators = [1]\ntoken = { file = "$CREDENTIALS_DIRECTORY/telegram" }\n')
    with pytest.raises(ConfigError) as err:
        resolve_secrets(load_settings(path))
    assert str(err.value) == (f"{path}: telegram.token.file = '$CREDENTIALS_DIRECTORY/telegram': $CREDENTIALS_DIRECTORY"
                              " is not set here; systemd sets it only inside the service (LoadCredential=), so the"
                              " secret can be read there only")
    (tmp_path / "telegram").write_text("123:TOKEN\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_secrets(load_settings(path)).telegram_token == Secret("123:TOKEN")


def test_every_mistake_is_reported_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "\n".join([
        "[heartbeat]", "run_timout = 60", 'check_interval = "often"', "stall_after = -1",
        "[data]", "shards = 0",
        "[project]", 'direction = "down"',
        "[telegram]", 'operators = ["alice"]',  # no second line about an empty allowlist
        "[slack]", "operators = ['U1']", "bot_token = 'xoxb-SECRET'",
    ]) + "\n")
    assert main(["config", "check", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    keys = ["heartbeat.run_timout", "heartbeat.check_interval", "project.direction", "telegram.operators[0]",
            "slack.bot_token", "data.shards", "heartbeat.stall_after"]
    assert len(lines) == len(keys), lines
    for key in keys:
        assert sum(key in line for line in lines) == 1, key
    assert all(str(path) in line for line in lines) and "SECRET" not in "".join(lines)


@pytest.mark.parametrize("metric", ["val-acc", "", "accuracy ", "top-1 (%)"])
def test_a_metric_no_log_line_can_carry_is_a_config_error(tmp_path: Path, metric: str) -> None:
    """It passed the check, and every run crashed: "no val-acc in the log", whatever the run printed."""
    path = write(tmp_path, f'[project]\nrun_command = "python fit.py"\nmetric = "{metric}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value) == (f"{path}: project.metric = {metric!r}: expected the name the run prints, of letters,"
                              " digits, _ and . (`accuracy: 0.91` after a line `---`, or `METRIC accuracy=0.91`)")


def test_a_score_command_without_a_run_command_is_a_config_error(tmp_path: Path) -> None:
    """It was ignored without a word: the built-in trainer ran and its harness scored."""
    path = write(tmp_path, '[project]\nscore_command = "python score.py"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value) == (f"{path}: project.score_command = 'python score.py': expected \"\" with the built-in"
                              " trainer (its harness scores), or your training command in project.run_command")


def test_cli_config_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(REPO / "config.example.toml")]) == 0
    assert "source = \"stdlib\"" in capsys.readouterr().out
    bad = write(tmp_path, "[loop]\nkeep_z = -1\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "loop.keep_z = -1.0" in err and "Traceback" not in err


def test_a_replaced_key_names_what_replaced_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[loop]\nconfirm_k = 2.0\nkeep_z = 2.5\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value) == (
        f"{path}: loop.confirm_k is no longer a setting: the keep rule replaced it with loop.keep_z (the standard"
        " errors a gain must beat) and loop.max_runs (the runs of a candidate before it is decided); remove it"
        " from [loop]")


@pytest.mark.parametrize(("section", "line", "key"), [
    ("loop", "pause_after_failures = 0", "loop.pause_after_failures"),  # paused after every experiment
    ("loop", "switch_area_after = -1", "loop.switch_area_after"),
    ("loop", "checkpoint_interval = 0", "loop.checkpoint_interval"),  # a busy loop while paused
    ("loop", "compile_cache_gb = 0", "loop.compile_cache_gb"),  # every graph pruned before it is used again
    ("proposer.agent", "timeout = 0", "proposer.agent.timeout"),
    ("heartbeat", "max_restarts_per_hour = -1", "heartbeat.max_restarts_per_hour"),
    ("digest", "log_tail_lines = -2", "digest.log_tail_lines"),
    ("loop", "keep_z = nan", "loop.keep_z"),  # nan fails every comparison: nothing would ever be kept
    ("heartbeat", "run_timeout = inf", "heartbeat.run_timeout"),
    ("workspace", 'path = ""', "workspace.path"),  # would be whatever directory nightlab starts in
    # git names changed files relative to the workspace: every proposal would be "outside editable"
    ("project", 'editable = ["/home/me/proj/train.py"]', "project.editable"),
    ("project", 'protected = ["../prepare.py"]', "project.protected"),
])
def test_values_the_loop_cannot_use_are_rejected(tmp_path: Path, section: str, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, f"[{section}]\n{line}\n"))
    (message,) = str(err.value).splitlines()
    assert message.startswith(f"{tmp_path / 'nightlab.toml'}: {key} = ") and "expected" in message


def test_a_path_under_an_unset_variable_says_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """expandvars keeps an unset $NAME as text: the workspace would silently become a folder named
    "$SCRATCH" beside the config. Each such path is named with its variable."""
    monkeypatch.delenv("NIGHTLAB_TEST_SCRATCH", raising=False)
    path = write(tmp_path, '[workspace]\npath = "$NIGHTLAB_TEST_SCRATCH/ws"\n'
                           '[data]\ncache_dir = "${NIGHTLAB_TEST_SCRATCH}/cache"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    lines = str(err.value).splitlines()
    assert f"{path}: workspace.path = '$NIGHTLAB_TEST_SCRATCH/ws': $NIGHTLAB_TEST_SCRATCH is not set here;" \
        " set it (for the service too, with Environment= in its unit) or write the path out" in lines
    assert any(line.startswith(f"{path}: data.cache_dir = '${{NIGHTLAB_TEST_SCRATCH}}/cache'") for line in lines)
    assert not (tmp_path / "$NIGHTLAB_TEST_SCRATCH").exists()
    monkeypatch.setenv("NIGHTLAB_TEST_SCRATCH", str(tmp_path / "scratch"))
    assert load_settings(path).workspace_path == tmp_path / "scratch" / "ws"


def test_a_misspelt_prompt_placeholder_is_named(tmp_path: Path) -> None:
    """{prompt_fle} would reach the agent's shell as text and the agent would get no prompt; the
    shell's own braces (${HOME}, awk's '{print}') are left alone."""
    path = write(tmp_path, '[proposer]\nkind = "agent"\n[proposer.agent]\n'
                           'command = "claude -p < {prompt_fle}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert (f"{path}: proposer.agent.command: {{prompt_fle}} is not a placeholder; the one nightlab replaces"
            " is {prompt_file} (the prompt's path)") in str(err.value).splitlines()
    fine = "my-agent --home ${HOME} < {prompt_file} | awk '{print}'"
    assert load_settings(write(tmp_path, f'[proposer]\nkind = "agent"\n[proposer.agent]\ncommand = "{fine}"\n'))


def test_what_a_process_can_read_of_the_secrets_is_starred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine has the file's token (an agent it starts could read the file too) and the
    environment's API keys; the variables the daemon kept from it are not there to know, and are no error."""
    token_file = tmp_path / "telegram"
    token_file.write_text("123456:AAH-from-a-file\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-proj-0123456789abcdef")
    monkeypatch.delenv("NIGHTLAB_SLACK_BOT_TOKEN", raising=False)
    path = write(tmp_path, f'[telegram]\noperators = [1]\ntoken = {{ file = "{token_file}" }}\n'
                           '[slack]\noperators = ["U1"]\nchannels = ["C1"]\n')
    redact = Redactor.known(load_settings(path))
    assert redact("bot 123456:AAH-from-a-file, key sk-proj-0123456789abcdef") == "bot ***, key ***"


@pytest.mark.parametrize("tag", ["my tag", "a..b", "nov23.lock", "x~1"])
def test_a_tag_git_takes_for_no_branch_is_a_config_error(tmp_path: Path, tag: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`nightlab config check` passed a tag git refuses in a branch name; the night then failed
    when it made the workspace. git's own rules judge it (`git check-ref-format --branch`)."""
    path = write(tmp_path, f'[workspace]\ntag = "{tag}"\n')
    assert main(["config", "check", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"nightlab: {path}: workspace.tag = {tag!r}: expected what git takes in a branch name (autoresearch/<tag>):"
        " letters, digits, '-', '_' or '.', e.g. \"nov23\""]
    assert load_settings(write(tmp_path, '[workspace]\ntag = "nov23-rope_2.1"\n')).workspace.tag == "nov23-rope_2.1"


@pytest.mark.parametrize("line", [
    '[workspace]\npath = "~nightlab-no-such-user/ws"',
    '[data]\ncache_dir = "~nightlab-no-such-user/cache"',
    '[data]\nsource = "~nightlab-no-such-user/shards"',
    '[executor]\nkind = "slurm"\n[executor.slurm]\nshared_dir = "~nightlab-no-such-user/shared"',
])
def test_a_home_of_no_user_here_is_a_config_error(tmp_path: Path, line: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`config check` passed it, then every command stopped with a RuntimeError traceback
    (Path.expanduser knows no home for an unknown ~user)."""
    path = write(tmp_path, line + "\n")
    assert main(["config", "check", str(path)]) == 2
    key = f"{line.splitlines()[-2].strip('[]')}.{line.splitlines()[-1].split(' = ')[0]}"
    (said,) = capsys.readouterr().err.splitlines()
    assert said.startswith(f"nightlab: {path}: {key} = '~nightlab-no-such-user/")
    assert said.endswith(": ~nightlab-no-such-user names no home folder (no user 'nightlab-no-such-user' here);"
                         " write the path out, or start it with ~/ for your own home")


def test_a_secret_file_under_a_home_of_no_user_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[telegram]\noperators = [1]\ntoken = { file = "~nightlab-no-such-user/token" }\n')
    with pytest.raises(ConfigError, match=r"telegram\.token\.file = '~nightlab-no-such-user/token': "
                                          "~nightlab-no-such-user names no home folder"):
        resolve_secrets(load_settings(path))


@pytest.mark.parametrize(("section", "line", "expected"), [
    # overflowed the scheduler's timer: the daemon crashed at start
    ("heartbeat", "check_interval = 1e300", "seconds from 0.1 to 3600 between supervision checks, e.g. 5"),
    ("heartbeat", "run_timeout = 1e300", "seconds from 1 to 604800 (a week)"),
    ("heartbeat", "stall_after = 1e12", "seconds from 1 to 604800 (a week)"),
    ("heartbeat", "loop_stall_after = 0.001", "seconds from 1 to 604800 (a week)"),
    ("heartbeat", "max_log_mb = 1e300", "megabytes from 0.1 to 1000000, e.g. 1024"),
    ("heartbeat", "min_free_disk_gb = -1", "gigabytes from 0 (no check) to 1000000000, e.g. 2"),
    ("heartbeat", "min_free_disk_gb = 1e300", "gigabytes from 0 (no check) to 1000000000, e.g. 2"),
    ("heartbeat", "max_restarts_per_hour = 100000", "from 0 (pause instead of restarting) to 60 restarts"),
    # a busy loop, or an Event.wait that overflows
    ("loop", "checkpoint_interval = 1e-9", "seconds from 0.05 to 60, e.g. 1.0"),
    ("loop", "checkpoint_interval = 1e300", "seconds from 0.05 to 60, e.g. 1.0"),
    ("loop", "keep_z = 1e300", "a number >= 0 and <= 10 (standard errors), e.g. 2"),
    ("loop", "noise_prior = 1e300", "a positive share from 1e-06 to 1 (all of it), e.g. 0.003 (0.3 % of the metric)"),
    ("loop", "decided_log_mb = 1e300", "0 (keep logs whole) or megabytes from 0.01 to 1000000, e.g. 1"),
    ("loop", "compile_cache_gb = 1e300", "a positive number of gigabytes up to 1000000, e.g. 20 (the compile caches are pruned"
                                         " past it)"),
    ("loop", "max_experiments = 9223372036854775807", "0 (no limit) or a number of experiments from 1 to 1000000"),
    ("proposer.agent", "timeout = 1e300", "seconds from 1 to 86400, e.g. 900"),
    ("proposer.agent", "max_output_mb = 1e300", "megabytes from 0.1 to 1000000, e.g. 100"),
    ("executor.slurm", 'shared_dir = "/s"\ntime_margin = 1e300', "seconds from 0 to 86400, e.g. 300"),
    ("executor.slurm", 'shared_dir = "/s"\npoll_interval = 1e300', "seconds from 0.01 to 600, e.g. 5"),
    ("executor.slurm", 'shared_dir = "/s"\njobs = 1000000', "at least 1 and at most 1000 (jobs in flight at once)"),
    ("trainer", "time_budget = 100000000", "0 (the profile's) or seconds of training from 1 to 86400, e.g. 300"),
    ("trainer", "max_seq_len = -8", "0 (the profile's) or a context length in tokens from 1 to 1048576, e.g. 1024"),
    ("trainer", "max_seq_len = 4294967296", "0 (the profile's) or a context length in tokens from 1 to 1048576,"
                                            " e.g. 1024"),
    ("trainer", "eval_tokens = -1", "0 (the profile's) or validation tokens from 1 to 100000000000, e.g. 4194304"),
    ("executor", "cpu_slots = 0", "at least 1 and at most 256 (CPU slots)"),
    ("executor", "cpu_slots = 1000000", "at least 1 and at most 256 (CPU slots)"),
    ("digest", "log_tail_lines = 1000000", "at least 1 and at most 1000 (log lines in a crash digest)"),
    ("data", "shards = 0", "-1 (all) or a number of training shards from 1 to 100000, e.g. 10"),
    ("data", "shards = -2", "-1 (all) or a number of training shards from 1 to 100000, e.g. 10"),
    ("data", 'cache_dir = ""', 'a directory, e.g. "~/.cache/nightlab"'),
    ("data", 'source = ""', '"climbmix", "stdlib", an http(s):// mirror or a folder of parquet shards'),
    # an empty entry names no file: every proposal would be refused
    ("project", 'editable = [""]', 'paths of files inside the workspace, relative to it, e.g. ["train.py"]'),
    ("project", 'editable = ["train.py", "."]', 'paths of files inside the workspace, relative to it, e.g.'
                                                ' ["train.py"]'),
])
def test_a_value_out_of_its_range_names_the_range(tmp_path: Path, section: str, line: str, expected: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Unbounded, these passed `config check` and crashed the daemon later (1e300 s overflowed
    its scheduler) or made the loop useless; each is one line that says the range, no traceback."""
    slurm = '[executor]\nkind = "slurm"\n' if section == "executor.slurm" else ""
    path = write(tmp_path, f"{slurm}[{section}]\n{line}\n")
    assert main(["config", "check", str(path)]) == 2
    (said,) = capsys.readouterr().err.splitlines()
    key = f"{section}.{line.splitlines()[-1].split(' = ')[0]}"
    assert said.startswith(f"nightlab: {path}: {key} = ") and said.endswith(f": expected {expected}"), said


@pytest.mark.parametrize("line", [
    "[data]\nshards = -1",  # all of them, as `nightlab prepare --shards -1`
    "[trainer]\nmax_seq_len = 0\neval_tokens = 0\ntime_budget = 0",  # the profile's
    "[heartbeat]\ncheck_interval = 0.1\nmin_free_disk_gb = 0\nmax_restarts_per_hour = 0",
    "[loop]\ncheckpoint_interval = 60\ndecided_log_mb = 0\nremeasure_every = 0\nmax_experiments = 0",
])
def test_the_ends_of_the_ranges_and_their_special_values_load(tmp_path: Path, line: str) -> None:
    assert load_settings(write(tmp_path, line + "\n"))


@pytest.mark.parametrize(("text", "said"), [
    # a section's own name inside another: the hint named "[]" (the top level)
    ("[heartbeat.loop]\nkeep_z = 2\n", "unknown key 'heartbeat.loop' in [heartbeat]; [loop] is a section of its own:"
                                       " write it as [loop], not inside [heartbeat] (known keys: "),
    ("[digest]\nloop = { keep_z = 2 }\n", "[loop] is a section of its own: write it as [loop], not inside [digest]"),
    ("[loops]\nkeep_z = 2\n", "unknown key 'loops' in the top level; did you mean [loop]? (known keys: "),
    ("[proposer.agnt]\ntimeout = 60\n", "unknown key 'proposer.agnt' in [proposer]; did you mean [proposer.agent]?"),
])
def test_a_misplaced_or_misspelt_section_is_named_with_its_header(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    message = str(err.value)
    assert said in message and "[]" not in message and len(message.splitlines()) == 1
