"""``!ops_logs <unit> [lines]``: only the allowed units, bounded, redacted, long output attached."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import pytest

from tests.support.chat import AUDIT_LOGGER, Harness, audit_records, only_reply
from tests.support.processes import write_script

#: A journalctl that records its argv and prints ``-n`` lines, one of them holding the token.
JOURNALCTL = """
import json, os, sys
here = os.path.dirname(os.path.abspath(sys.argv[0]))
with open(os.path.join(here, "journal-calls.jsonl"), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
unit = sys.argv[sys.argv.index("-u") + 1]
count = int(sys.argv[sys.argv.index("-n") + 1])
for n in range(count):
    print(f"2024-05-01T12:00:00+0000 web-1 {unit}[42]: line {n} " + "x" * 60)
print("2024-05-01T12:00:01+0000 web-1 proxy[42]: token test-bot-token-value-0123456789 @everyone")
"""


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "journalctl"
    directory.mkdir()
    script = write_script(directory / "journalctl", JOURNALCTL, interpreter=sys.executable)
    monkeypatch.setenv("OPS_JOURNALCTL", str(script))
    return directory / "journal-calls.jsonl"


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def test_reads_the_last_lines_of_an_allowed_unit_redacted(
    harness: Harness, journal: Path, sent
) -> None:
    await harness.add_cog()
    message = await harness.say("!ops_logs proxy 3")

    reply = only_reply(sent, message).content
    assert reply.startswith("📜 Last 4 lines of `proxy.service`\n```\n")
    assert "proxy.service[42]: line 2 " in reply
    assert "test-bot-token-value-0123456789" not in reply
    assert "token ***" in reply
    assert calls(journal) == [["-u", "proxy.service", "-n", "3", "--no-pager", "-o", "short-iso"]]


async def test_fifty_lines_by_default_and_a_long_tail_is_an_attachment(
    harness: Harness, journal: Path, sent
) -> None:
    await harness.add_cog(harness.settings(OPS_LOG_UNITS="worker@1"))
    message = await harness.say("!ops_logs worker@1.service")

    reply = only_reply(sent, message)
    assert reply.content == "📜 Last 51 lines of `worker@1.service`\n📎 Full output attached."
    attached = reply.files["ops_logs.txt"]
    assert len(attached.splitlines()) == 51
    assert "test-bot-token-value-0123456789" not in attached
    assert calls(journal)[0][3] == "50"


@pytest.mark.parametrize(
    ("typed", "answer"),
    [
        ("!ops_logs sshd", "`sshd` is not a unit `!ops_logs` may read. Units: `bot.service`"),
        ("!ops_logs --file=/etc/shadow", "`--file=/etc/shadow` is not a unit `!ops_logs` may"),
        ("!ops_logs", "Usage: `!ops_logs <unit> [lines]`, e.g. `!ops_logs bot.service 100`."),
        ("!ops_logs proxy 2001", "Lines for `!ops_logs` must be a whole number from 1 to 2000"),
        ("!ops_logs proxy 0", "Lines for `!ops_logs` must be a whole number from 1 to 2000"),
        ("!ops_logs proxy ten", "Lines for `!ops_logs` must be a whole number from 1 to 2000"),
    ],
)
async def test_anything_else_is_refused_without_running_anything(
    harness: Harness, journal: Path, sent, typed: str, answer: str, caplog
) -> None:
    await harness.add_cog()
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        message = await harness.say(typed)

    assert only_reply(sent, message).content.startswith(answer)
    assert calls(journal) == []
    [record] = audit_records(caplog)
    assert record["outcome"] == "refused:config"


async def test_a_member_without_the_role_learns_no_unit_names(
    harness: Harness, journal: Path, sent
) -> None:
    await harness.add_cog()
    message = await harness.say("!ops_logs sshd", member=harness.outsider)

    assert only_reply(sent, message).content == "You need an ops role to run `!ops_logs`."
    assert calls(journal) == []


async def test_without_a_readable_unit_it_is_not_configured(harness: Harness, sent) -> None:
    settings = harness.settings()
    await harness.add_cog(dataclasses.replace(settings, bot_service=None, proxy_service=None))
    message = await harness.say("!ops_logs proxy")

    assert only_reply(sent, message).content == (
        "`!ops_logs` is not configured: set OPS_BOT_SERVICE, OPS_PROXY_SERVICE or OPS_LOG_UNITS"
    )


async def test_a_failing_journalctl_is_reported_and_gives_the_cooldown_back(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent
) -> None:
    failing = write_script(
        tmp_path / "failing-journalctl",
        'echo "Failed to open journal: Permission denied" >&2\nexit 1\n',
    )
    monkeypatch.setenv("OPS_JOURNALCTL", str(failing))
    await harness.add_cog()
    first = await harness.say("!ops_logs proxy")
    second = await harness.say("!ops_logs proxy")

    for message in (first, second):  # not "cooling down": the failed run read nothing
        reply = only_reply(sent, message).content
        assert reply.startswith(
            "❌ Could not read the journal of `proxy.service`: journalctl failed (exit 1)"
        )
        assert "Permission denied" in reply


async def test_a_second_read_within_ten_seconds_is_cooling_down(
    harness: Harness, journal: Path, sent
) -> None:
    await harness.add_cog()
    await harness.say("!ops_logs proxy 1")
    message = await harness.say("!ops_logs bot 1", member=harness.admins[1])

    assert re.fullmatch(
        r"`!ops_logs` is cooling down — try again in (9|10) s\.", only_reply(sent, message).content
    )
    assert len(calls(journal)) == 1
