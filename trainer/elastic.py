"""``python -m loraplane.trainer.elastic TORCHRUN-ARGS``: one node of a multi-node run, as a Job's pod.

torchrun's elastic agent (``torch.distributed.run``, the same arguments) with what a pod of an
Indexed Job (or of a JobSet's child Job) needs around it:

- **who hosts the rendezvous.** The c10d backend keeps its store in one agent, the one at
  ``--rdzv-endpoint``. torchrun guesses whether that is this machine from DNS, which is racy in a
  fresh pod (its own headless-Service record may not exist yet). Here pod ``JOB_COMPLETION_INDEX=0``
  hosts it (``is_host=1``) and every other pod is a client (``is_host=0``).
- **waiting for pod 0.** A client pod first waits until the endpoint takes connections (pod 0 may
  still be pulling a multi-GB image), up to the rendezvous ``join_timeout``.
- **exit codes the Job's ``podFailurePolicy`` can act on** (``loraplane.trainer.exit_codes``):
  torchrun exits 1 whatever its workers exited with. Here a worker's 2 (do not retry) stays 2, all
  workers preempted (75) stays 75, and the loss of the rendezvous host after this pod had joined
  (pod 0 gone: its store with it) is 76, ``PEER_LOST``: this pod did nothing wrong and stops, so
  that the whole gang restarts around a new pod 0.

Gang semantics: the run is ``--nnodes=N`` (N..N): every round of the rendezvous needs all N nodes.
When a pod other than 0 is lost, the other pods' workers fail (a collective with a vanished peer),
their agents restart them (``--max-restarts``) into a new round that waits for N nodes; the Job
controller starts the replacement pod at the same index and hostname, it joins, and all workers
start again, resuming from the newest complete checkpoint. A healthy worker hung in NCCL is
restarted too: an agent that sees a new node waiting restarts its workers (not counted as a retry).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Any

from loraplane.trainer.exit_codes import DO_NOT_RETRY, FAILED, PEER_LOST, PREEMPTED

DEFAULT_JOIN_TIMEOUT = 600.0


def _say(message: str) -> None:
    print(f"loraplane.trainer.elastic: {message}", file=sys.stderr, flush=True)  # noqa: T201


def _conf(text: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def _endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        return endpoint, 29400  # torchrun's default port for the c10d rendezvous
    return host.strip("[]"), int(port)


def wait_for_endpoint(host: str, port: int, *, timeout: float) -> bool:
    """Whether ``host:port`` took a TCP connection within ``timeout`` seconds (DNS failures retried)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5.0):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def exit_code_for(worker_codes: list[int]) -> int:
    """The pod's exit code for the exit codes of its failed workers."""
    if DO_NOT_RETRY in worker_codes:
        return DO_NOT_RETRY
    if worker_codes and all(code == PREEMPTED for code in worker_codes):
        return PREEMPTED
    return FAILED


def configure(args: Any, environ: dict[str, str] | os._Environ[str]) -> bool:
    """Set ``is_host`` in ``args.rdzv_conf`` from the pod's index; whether this node hosts the store."""
    conf = _conf(args.rdzv_conf or "")
    index = environ.get("JOB_COMPLETION_INDEX")
    if "is_host" not in conf and index is not None and args.rdzv_backend == "c10d":
        conf["is_host"] = "1" if index == "0" else "0"
        args.rdzv_conf = ",".join(f"{k}={v}" for k, v in conf.items())
    return conf.get("is_host", "0").lower() in ("1", "true", "yes", "y")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousError
    from torch.distributed.run import get_args_parser, run

    # With the rendezvous store shared with the workers (torch's default), a round whose rank 0 is a
    # surviving agent never publishes the store's address to a replacement node, which then times out
    # waiting for MASTER_ADDR: the gang could not restart. One store per round avoids it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    hosting = configure(args, os.environ)
    joined = hosting
    if args.rdzv_backend == "c10d" and not hosting and args.rdzv_endpoint:
        host, port = _endpoint(args.rdzv_endpoint)
        timeout = float(_conf(args.rdzv_conf or "").get("join_timeout", DEFAULT_JOIN_TIMEOUT))
        _say(f"waiting for the rendezvous at {host}:{port} (up to {timeout:.0f} s)")
        if not wait_for_endpoint(host, port, timeout=timeout):
            _say(f"the rendezvous at {host}:{port} took no connection in {timeout:.0f} s")
            return FAILED
        joined = True
    try:
        run(args)
    except ChildFailedError as exc:
        codes = sorted(failure.exitcode for failure in exc.failures.values())
        code = exit_code_for(codes)
        _say(f"workers failed with exit codes {codes}; exiting {code}")
        return code
    except SignalException as exc:
        if exc.sigval == signal.SIGTERM:
            # the agent forwarded it and waited (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) for the workers, which
            # save a checkpoint and exit 75 on SIGTERM: the pod was preempted, not broken
            _say(f"stopped by SIGTERM; the workers saved and stopped; exiting {PREEMPTED}")
            return PREEMPTED
        _say(f"stopped by signal {exc.sigval.name}; workers were asked to save and stop")
        return 128 + int(exc.sigval)
    except RendezvousConnectionError as exc:
        if not joined:
            raise
        _say(f"lost the rendezvous host ({exc}); exiting {PEER_LOST} so that the whole gang restarts")
        return PEER_LOST
    except RendezvousError as exc:
        _say(f"rendezvous failed: {type(exc).__name__}: {exc}")
        return FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
