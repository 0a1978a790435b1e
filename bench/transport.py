"""Benchmark duet's transport against its baselines, side by side, and print JSON.

Everything runs on loopback, each end in its own OS process (spawned), in one run:

* **duet** (default config): setup (owner's ``launch`` to peer connected), small-message
  round trip (``r.ping()``), throughput of 1/64/256 MiB float32 tensors (owner shares,
  researcher ``.get()``s under an auto-approve rule; request to value received; SHA-256
  checked), peak RSS of both sides during the largest transfer;
* **bare aiortc**: one data channel between two processes (SDP through the parent), chunk
  size and ``bufferedAmount`` high water swept, the best setting then used for every size;
  its setup and ping round trip;
* **tcp**: a plain asyncio socket on 127.0.0.1, same payloads;
* **bare aiortc, 4 MiB UDP buffers**: the best setting again with SO_RCVBUF/SO_SNDBUF raised
  on the ICE sockets (an experiment: does avoiding kernel drops help?);
* **duet sweep**: ``frame_size`` x ``buffer_high_water`` on one payload, to pick defaults;
* ratios and targets (reported as booleans, never asserted).

Usage::

    .venv/bin/python bench/transport.py            # full: 1, 64, 256 MiB (a few minutes)
    .venv/bin/python bench/transport.py --quick    # 1 and 16 MiB, small sweep (< 1 minute)
    .venv/bin/python bench/transport.py --sizes 1 8 32 --no-sweep

Progress goes to stderr; the JSON result to stdout. Throughputs are MB/s (10^6 bytes/s);
``udp_drops`` counts the kernel's UDP receive-buffer drops during a run (system-wide).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    KiB,
    MiB,
    TcpPeer,
    bare_rtc_pair,
    duet_pair,
    emit,
    log,
    machine,
    peers,
    signaling_server,
    summary_ms,
    udp_rcvbuf_errors,
)

from duet.config import SessionConfig

DEFAULT_FRAME = SessionConfig().frame_size  # duet's own defaults, whatever they become
DEFAULT_HIGH_WATER = SessionConfig().buffer_high_water


def _rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 2)


def _reps(nbytes: int) -> int:
    """Small payloads are noisy: take the median of a few; big ones once."""
    return 3 if nbytes <= 16 * MiB else 1


def _throughput(runs: list[dict[str, Any]], nbytes: int, expected: str) -> dict[str, Any]:
    seconds = [run["seconds"] for run in runs]
    median = statistics.median(seconds)
    return {
        "bytes": nbytes,
        "runs": len(runs),
        "seconds_median": round(median, 4),
        "mb_per_s": _rate(nbytes, median),
        "mb_per_s_best": _rate(nbytes, min(seconds)),
        "hash_ok": all(run["sha256"] == expected for run in runs),
        **({"udp_drops": [run["udp_drops"] for run in runs]} if "udp_drops" in runs[0] else {}),
    }


# -- the runs -------------------------------------------------------------------------------
def _duet_get(owner: Any, researcher: Any, name: str, nbytes: int,
              rss: bool = False) -> dict[str, Any]:
    if not rss:
        return dict(researcher.call("get", name, nbytes, timeout=900))
    owner.call("rss_start")
    run = dict(researcher.call("get", name, nbytes, True, timeout=900))
    run["rss_owner"] = owner.call("rss_stop", nbytes)
    return run


def _bare_get(sender: Any, receiver: Any, nbytes: int, best: dict[str, int],
              rss: bool = False) -> dict[str, Any]:
    if not rss:
        return dict(receiver.call("transfer", nbytes, best["chunk"], best["high_water"],
                                  timeout=900))
    sender.call("rss_start")
    run = dict(receiver.call("transfer", nbytes, best["chunk"], best["high_water"], True,
                             timeout=900))
    run["rss_sender"] = sender.call("rss_stop", nbytes)
    return run


def bare_sweep(sender: Any, receiver: Any, sweep_size: int, chunks: list[int],
               high_waters: list[int]) -> dict[str, Any]:
    """Chunk size at the default high water, then high water at the best chunk."""
    expected = sender.call("prepare", sweep_size, timeout=300)

    def measure(chunk: int, high: int) -> dict[str, Any]:
        runs = [receiver.call("transfer", sweep_size, chunk, high, timeout=900)
                for _ in range(2)]
        entry = {"chunk": chunk, "high_water": high, **_throughput(runs, sweep_size, expected)}
        log(f"bare sweep chunk={chunk // KiB}K hw={high // KiB}K: {entry['mb_per_s']} MB/s "
            f"(best {entry['mb_per_s_best']})")
        return entry

    results = [measure(chunk, DEFAULT_HIGH_WATER) for chunk in chunks]
    best_chunk = max(results, key=lambda e: e["mb_per_s_best"])["chunk"]
    results += [measure(best_chunk, high) for high in high_waters if high != DEFAULT_HIGH_WATER]
    best = max(results, key=lambda e: e["mb_per_s_best"])
    return {"payload_mib": sweep_size // MiB, "results": results,
            "best": {"chunk": best["chunk"], "high_water": best["high_water"]}}


def side_by_side(owner: Any, researcher: Any, sender: Any, receiver: Any, sizes: list[int],
                 best: dict[str, int], rss_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every size over duet and the bare channel, runs alternating so load hits both alike."""
    duet_out: dict[str, Any] = {}
    bare_out: dict[str, Any] = {}
    for nbytes in sizes:
        key = f"{nbytes // MiB}MiB"
        name = f"t{nbytes}"
        duet_hash = owner.call("share_payload", name, nbytes, timeout=300)
        bare_hash = sender.call("prepare", nbytes, timeout=300)
        duet_runs: list[dict[str, Any]] = []
        bare_runs: list[dict[str, Any]] = []
        for rep in range(max(2, _reps(nbytes))):
            rss = nbytes == rss_size and rep == 0  # first transfer of this size: clean RSS
            duet_runs.append(_duet_get(owner, researcher, name, nbytes, rss))
            bare_runs.append(_bare_get(sender, receiver, nbytes, best, rss))
        owner.call("unshare", name)
        duet_out[key] = _throughput(duet_runs, nbytes, duet_hash)
        duet_out[key]["value_type"] = duet_runs[0]["type"]
        bare_out[key] = _throughput(bare_runs, nbytes, bare_hash)
        if nbytes == rss_size:
            duet_out[key]["peak_rss"] = {"owner": duet_runs[0]["rss_owner"],
                                         "researcher": duet_runs[0]["rss"]}
            bare_out[key]["peak_rss"] = {"sender": bare_runs[0]["rss_sender"],
                                         "receiver": bare_runs[0]["rss"]}
        log(f"{key}: duet {duet_out[key]['mb_per_s']} MB/s (best {duet_out[key]['mb_per_s_best']}),"
            f" bare {bare_out[key]['mb_per_s']} MB/s (best {bare_out[key]['mb_per_s_best']})")
    return duet_out, bare_out


def run_tcp(sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"chunk": MiB}
    with peers(("tcp-sender", TcpPeer, ("sender",)),
               ("tcp-receiver", TcpPeer, ("receiver",))) as (sender, receiver):
        port = receiver.call("listen")
        sender.call("connect", port)
        out["throughput"] = {}
        for nbytes in sizes:
            expected = sender.call("prepare", nbytes, timeout=300)
            runs = [receiver.call("transfer", nbytes, timeout=300) for _ in range(3)]
            out["throughput"][f"{nbytes // MiB}MiB"] = entry = _throughput(runs, nbytes, expected)
            log(f"tcp {nbytes // MiB} MiB: {entry['mb_per_s']} MB/s")
    return out


def duet_config_sweep(
    url: str, configs: list[tuple[int, int]], nbytes: int
) -> list[dict[str, Any]]:
    """A fresh duet pair per (frame_size, buffer_high_water); best of 2 transfers of nbytes."""
    results = []
    for frame, high in configs:
        options = {"frame_size": frame, "buffer_high_water": high}
        with duet_pair(url, options) as (owner, researcher, setup):
            expected = owner.call("share_payload", "t", nbytes, timeout=300)
            runs = [_duet_get(owner, researcher, "t", nbytes) for _ in range(2)]
        entry = {"frame_size": frame, "buffer_high_water": high,
                 **_throughput(runs, nbytes, expected),
                 "setup_s": setup["launch_to_connected_s"]}
        log(f"duet sweep frame={frame // KiB}K hw={high // KiB}K: {entry['mb_per_s']} MB/s "
            f"(best {entry['mb_per_s_best']})")
        results.append(entry)
    return results


# -- main -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", metavar="MIB",
                        help="payload sizes in MiB (default 1 64 256; --quick: 1 16)")
    parser.add_argument("--quick", action="store_true",
                        help="1 and 16 MiB, a reduced sweep: under a minute")
    parser.add_argument("--pings", type=int, default=500, help="round trips to time")
    parser.add_argument("--sweep-size", type=int, metavar="MIB",
                        help="payload for the chunk / frame sweeps (default 64; --quick 16)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the duet config sweep")
    args = parser.parse_args()

    sizes_mib = args.sizes or ([1, 16] if args.quick else [1, 64, 256])
    sizes = [s * MiB for s in sizes_mib]
    sweep_size = (args.sweep_size or (16 if args.quick else 64)) * MiB
    rss_size = max(sizes)
    pings = min(args.pings, 200) if args.quick else args.pings
    chunks = [16 * KiB, 64 * KiB, 256 * KiB]
    high_waters = [256 * KiB, MiB, 4 * MiB]
    if args.quick:
        duet_sweep = [(16 * KiB, MiB), (256 * KiB, MiB)]
        high_waters = [MiB]
    else:
        duet_sweep = [(f, h) for f in chunks for h in high_waters
                      if (f, h) != (DEFAULT_FRAME, DEFAULT_HIGH_WATER)]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "transport",
        "machine": machine(),
        "params": {"sizes_mib": sizes_mib, "sweep_mib": sweep_size // MiB, "pings": pings,
                   "quick": args.quick, "rss_measured_at_mib": rss_size // MiB},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    udp_drops_before = udp_rcvbuf_errors()
    default_options = {"frame_size": DEFAULT_FRAME, "buffer_high_water": DEFAULT_HIGH_WATER}
    with signaling_server() as url:
        log("starting duet (default config) and bare aiortc pairs")
        with duet_pair(url, default_options) as (owner, researcher, duet_setup), \
                bare_rtc_pair() as (sender, receiver, bare_setup):
            duet: dict[str, Any] = {**default_options, "setup": duet_setup}
            bare: dict[str, Any] = {"setup": bare_setup}
            # round trips, in alternating blocks
            duet_pings: list[float] = []
            bare_pings: list[float] = []
            researcher.call("ping", 0)
            receiver.call("ping", 20)
            for _ in range(5):
                duet_pings += researcher.call("ping", pings // 5, 0)
                bare_pings += receiver.call("ping", pings // 5)
            duet["ping"] = summary_ms(duet_pings)
            bare["ping"] = summary_ms(bare_pings)
            log(f"ping: duet {duet['ping']['median_ms']} ms, bare {bare['ping']['median_ms']} ms")
            bare["sweep"] = bare_sweep(sender, receiver, sweep_size, chunks, high_waters)
            bare["best"] = best = bare["sweep"]["best"]
            duet["throughput"], bare["throughput"] = side_by_side(
                owner, researcher, sender, receiver, sizes, best, rss_size)
            # experiment: the same best setting with 4 MiB UDP socket buffers (no drops?)
            granted = sender.call("udp_buffers", 4 * MiB) + receiver.call("udp_buffers", 4 * MiB)
            expected = sender.call("prepare", sweep_size, timeout=300)
            runs = [_bare_get(sender, receiver, sweep_size, best) for _ in range(2)]
            bare["with_4mib_udp_buffers"] = {"granted_rcvbuf": granted,
                                             **_throughput(runs, sweep_size, expected)}
        result["duet"], result["bare_aiortc"] = duet, bare
        log("tcp")
        result["tcp"] = run_tcp(sizes)
        if not args.no_sweep:
            log("duet config sweep")
            sweep = duet_config_sweep(url, duet_sweep, sweep_size)
            result["duet_config_sweep"] = {
                "payload_mib": sweep_size // MiB,
                "note": "one fresh pair per config, best of 2; compare mb_per_s_best",
                "results": sorted(sweep, key=lambda e: -e["mb_per_s_best"]),
            }

    tcp = result["tcp"]
    ratios = {}
    for key, entry in duet["throughput"].items():
        b, t = bare["throughput"][key], tcp["throughput"][key]
        ratios[key] = {
            "duet_vs_bare_aiortc_median": round(entry["mb_per_s"] / b["mb_per_s"], 3),
            "duet_vs_bare_aiortc_best": round(entry["mb_per_s_best"] / b["mb_per_s_best"], 3),
            "duet_vs_tcp": round(entry["mb_per_s"] / t["mb_per_s"], 4),
            "bare_aiortc_vs_tcp": round(b["mb_per_s"] / t["mb_per_s"], 4),
        }
    result["ratios"] = ratios
    rss = duet["throughput"][f"{rss_size // MiB}MiB"].get("peak_rss", {})
    result["targets"] = {
        "throughput_ge_90pct_of_bare_aiortc": {
            k: v["duet_vs_bare_aiortc_median"] >= 0.9 for k, v in ratios.items()},
        "setup_under_1s": duet["setup"]["launch_to_connected_s"] < 1.0,
        "peak_extra_memory_under_2x_payload": {
            side: rss[side]["peak_extra_x_payload"] < 2.0 for side in ("owner", "researcher")
            if side in rss},
        "hashes_ok": all(e["hash_ok"] for part in (duet, bare, tcp)
                         for e in part["throughput"].values()),
    }
    result["udp_rcvbuf_errors_during_run"] = udp_rcvbuf_errors() - udp_drops_before
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
