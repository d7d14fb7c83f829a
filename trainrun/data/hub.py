"""The Hugging Face hub, for names that are not local paths: one quick look whether it can
be reached at all, so that an offline machine fails (or reads its local cache) at once
instead of retrying each request for half a minute."""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from urllib.parse import urlparse

from trainrun.errors import ConfigError

PROBE_SECONDS = 3.0


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def reachable(timeout: float = PROBE_SECONDS) -> bool:
    """A TCP connection to the hub's host opens within `timeout` seconds (the name look-up
    included, which a socket timeout does not bound: hence the thread)."""
    url = urlparse(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    ok = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # what turns the hub off for `datasets`


def _offline_set(switches: tuple[str, ...] = SWITCHES) -> list[str]:
    """The variables of `switches` that are set and turn the hub off (HF_HUB_OFFLINE=1)."""
    return [name for name in switches
            if os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")]


@contextmanager
def offline_unless_reachable(name: str, key: str = "data.path",
                             switches: tuple[str, ...] = SWITCHES):
    """Run the body offline (local cache only) when `name` is a hub name and the hub cannot
    be reached; a failure then is one ConfigError line for `key`. So is a name that is not
    in the local cache when one of `switches` turns the hub off (HF_HUB_OFFLINE=1)."""
    if os.path.exists(os.path.expanduser(name)):
        yield
        return
    if off := _offline_set(switches):
        try:
            yield
        except OSError:  # the hub's and `datasets`' "not in the cache" and "offline" errors
            variables = " and ".join(f"{v}={os.environ[v]}" for v in off)
            raise ConfigError(key, f"{name!r}: the hub is turned off ({variables}) and "
                                   f"{name!r} is not in the local cache; allowed: a local file "
                                   f"or folder, or a hub name once online ({' and '.join(off)} "
                                   f"unset)") from None
        return
    if reachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    except ConfigError:
        raise
    except Exception:
        raise ConfigError(key, f"{name!r}: the hub ({endpoint()}) cannot be reached and "
                               f"{name!r} is not in the local cache; allowed: a local file or "
                               f"folder, or a hub name once online") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
