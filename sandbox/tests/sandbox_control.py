"""The sandbox's control port, for the Python driver conformance scripts in this folder."""

import os
import socket


def control(command):
    """Sends one command to VAULT_SANDBOX_CONTROL and returns its answer, which must be ok."""
    host, port = os.environ["VAULT_SANDBOX_CONTROL"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall((command + "\n").encode())
        answer = s.makefile().readline()
    assert answer.startswith("ok"), answer
    return answer
