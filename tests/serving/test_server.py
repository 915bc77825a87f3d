"""The address checks made before the model loads: loopback or not, a taken port, an unknown host."""
from __future__ import annotations

import socket

import pytest

from fcnseg.errors import OptionError
from fcnseg.serving.server import check_address, is_loopback


@pytest.mark.parametrize("host, expected", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("192.168.1.20", False),
                                            ("::", False), ("example.org", False)])
def test_loopback_addresses(host, expected):
    assert is_loopback(host) is expected


def test_a_taken_port_and_an_unknown_host_are_usage_errors():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OptionError, match=f"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", port)  # free again: no error
    with pytest.raises(OptionError, match="--host no-such-host.invalid: unknown address"):
        check_address("no-such-host.invalid", 7860)
