"""An ssh ProxyCommand that reaches a port on this machine: stdin → the socket → stdout.

The tests' stand-in for `aws ssm start-session ... AWS-StartSSHSession`, which does the same
through Session Manager: `ProxyCommand python relay.py 127.0.0.1 %p`.
"""

import socket
import sys
import threading


def main() -> None:
    connection = socket.create_connection((sys.argv[1], int(sys.argv[2])))

    def upstream() -> None:
        while chunk := sys.stdin.buffer.read1(65536):
            connection.sendall(chunk)
        connection.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while chunk := connection.recv(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
