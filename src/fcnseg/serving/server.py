"""Running the app with uvicorn: the address checked first, so a taken port is one line, not a traceback."""
from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

from fcnseg.errors import FcnsegError, OptionError

if TYPE_CHECKING:
    from starlette.applications import Starlette


def require_web_libraries() -> None:
    """Raises a usage error saying how to install the ``[serve]`` extra when its libraries are missing."""
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise FcnsegError(f"fcnseg serve needs {', '.join(missing)} (python-multipart for 'multipart'); "
                          "install them with: pip install 'fcnseg[serve]'")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """Binds and releases ``host:port`` once, so that a taken port or an unknown host is a usage error.

    Raises:
        OptionError: naming the address and what to do.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OptionError(f"--host {host}: unknown address ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise OptionError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port "
                              "(or stop the program using it)") from None


def run_server(app: Starlette, host: str, port: int) -> None:
    """Serves ``app`` until Ctrl-C or SIGTERM (uvicorn, one process; the model is loaded once).

    Stopping is the normal end of a server, not an interruption: uvicorn finishes the requests in
    flight, then re-raises the signal, which ends here.
    """
    import uvicorn

    check_address(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
