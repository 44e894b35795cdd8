"""``REDIS_URL=redis+sentinel://…``: one parser, what it accepts, and its secrets kept out of sight.

No Redis here: these are the parser's and the client factory's pure parts (the failover tests
run real sentinels).
"""

from __future__ import annotations

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from core.env_reader import SentinelTarget, parse_sentinel_url, url_password, url_secrets
from core.redis_client import (
    SENTINEL_TIMEOUT,
    FailoverConnection,
    make_redis,
    uses_sentinel,
)
from core.settings import DaemonSettings, PublisherSettings, Settings, SettingsError

URL = (
    "redis+sentinel://ops:master-pw-1@10.0.0.1:26379,10.0.0.2,[fd00::3]:26380/admin-ops/2"
    "?sentinel_password=sentinel-pw-2"
)


def test_the_url_names_the_sentinels_the_service_the_database_and_both_passwords() -> None:
    target = parse_sentinel_url(URL)
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("fd00::3", 26380))
    assert (target.service, target.db, target.username) == ("admin-ops", 2, "ops")
    assert (target.password, target.sentinel_password) == ("master-pw-1", "sentinel-pw-2")
    # Neither password shows in a repr: targets end up in logs more easily than the URL.
    assert "pw" not in repr(target)
    assert parse_sentinel_url("redis+sentinel://h/m") == SentinelTarget((("h", 26379),), "m")
    # Percent-encoded passwords are decoded; "+" is a plus, not a space.
    encoded = parse_sentinel_url("redis+sentinel://:a%40b+c@h/m?sentinel_password=d%26e")
    assert (encoded.password, encoded.sentinel_password) == ("a@b+c", "d&e")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379,h2:26379", "then the service"),
        ("redis+sentinel:///mymaster", "then the service"),
        ("redis+sentinel://h1,,h2/mymaster", "then the service"),
        ("redis+sentinel://h1:x/mymaster", "sentinel 1 must be host:port"),
        ("redis+sentinel://h1,h2:70000/mymaster", "sentinel 2 must be host:port"),
        ("redis+sentinel://fd00::3:26379/mymaster", "IPv6 address in []"),
        ("redis+sentinel://h/my master", "needs the Sentinel service"),
        ("redis+sentinel://h/mymaster/zero", "must be a number"),
        ("redis+sentinel://h/mymaster?password=x", "the only query parameter"),
        ("redis+sentinel://h/mymaster#frag", "#fragment"),
        ("redis+sentinel://" + ",".join(["h"] * 17) + "/m", "at most 16"),
    ],
)
def test_a_bad_url_is_a_settings_error_naming_the_variable(url: str, says: str) -> None:
    for settings in (Settings, DaemonSettings, PublisherSettings):
        with pytest.raises(SettingsError) as caught:
            settings.from_env({"REDIS_URL": url, "OPS_CONTROL_SECRET": "fleet-secret-1"})
        (problem,) = caught.value.problems
        assert problem.startswith("REDIS_URL: ")
        assert says in problem


@pytest.mark.parametrize(
    "url",
    [
        # A "/" or "&" left unencoded in a password moves it where the parser looks for hosts
        # or parameters: the error must still not quote it.
        "redis+sentinel://:pass/word-123@h/m",
        "redis+sentinel://h/m?sentinel_password=abc&word-123",
        "redis+sentinel://h/m?word-123=sentinel_password",
    ],
)
def test_no_error_quotes_a_password(url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"REDIS_URL": url})
    assert "word-123" not in str(caught.value)


def test_both_passwords_are_secrets_and_redacted_from_the_shown_url() -> None:
    assert url_password(URL) == "master-pw-1"
    assert set(url_secrets(URL)) == {"master-pw-1", "sentinel-pw-2"}
    # As written in the URL and decoded, so both forms are redacted.
    assert set(url_secrets("redis+sentinel://:a%40b@h/m?sentinel_password=c%26d")) == {
        "a@b",
        "a%40b",
        "c&d",
        "c%26d",
    }
    settings = Settings.from_env({"REDIS_URL": URL, "DISCORD_TOKEN": "token-value-1"})
    assert {"master-pw-1", "sentinel-pw-2"} <= set(settings.secrets)
    shown = settings.masked_redis_url or ""
    assert "master-pw-1" not in shown
    assert "sentinel-pw-2" not in shown
    assert "10.0.0.1:26379,10.0.0.2,[fd00::3]:26380/admin-ops/2" in shown
    assert "master-pw-1" not in repr(settings)
    for other in (DaemonSettings, PublisherSettings):
        loaded = other.from_env({"REDIS_URL": URL, "OPS_CONTROL_SECRET": "fleet-secret-1"})
        assert {"master-pw-1", "sentinel-pw-2"} <= set(loaded.secrets)
        assert loaded.redis_url == URL


async def test_the_factory_builds_a_sentinel_master_client_and_plain_ones_as_before() -> None:
    client = make_redis(URL)
    try:
        assert uses_sentinel(client)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "admin-ops"
        assert pool.connection_class is FailoverConnection
        assert pool.connection_kwargs["password"] == "master-pw-1"
        assert pool.connection_kwargs["username"] == "ops"
        assert pool.connection_kwargs["db"] == 2
        sentinels = pool.sentinel_manager.sentinels
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [
            26379,
            26379,
            26380,
        ]
        for sentinel in sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            # The sentinels get their own password, never the master's, and no retries.
            assert kwargs["password"] == "sentinel-pw-2"
            assert kwargs["socket_timeout"] == SENTINEL_TIMEOUT
            assert kwargs["retry"].get_retries() == 0
    finally:
        await client.aclose()
    plain = make_redis("redis://127.0.0.1:6379/0")
    try:
        assert not uses_sentinel(plain)
    finally:
        await plain.aclose()
