"""find-heads throughput with 1 and 2 data-parallel ranks (torchrun, gloo) on the embedded model.

    .venv/bin/python benchmarks/bench_distributed.py [--n-prompts 32] [--batch-size 4] [--ranks 1,2] [--fresh]

Each rank count runs as its own ``python -m torch.distributed.run --nproc-per-node N`` job. Inside
it every rank loads the model and builds the probe prompts, then all ranks meet at a barrier, and
the timed part is what find-heads does with them: score this rank's share of the prompts
(``distributed.shard_batches``) and all-reduce the per-head sums, up to a second barrier. Reported:
scoring prompts/s (the timed part), the job's whole wall time (model loads included), and the
2-rank/1-rank ratio. torchrun gives each of N > 1 ranks ``OMP_NUM_THREADS=1``; a single rank keeps
torch's default thread count, so "1 rank" uses every core too and the ratio compares processes
against threads on the same cores. The machine's load average is recorded with every result,
because other jobs on a shared machine move these figures a lot.

Results are saved per rank count as they finish (benchmarks/results/distributed/), so an
interrupted run resumes; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "distributed"


def worker(n_prompts: int, batch_size: int, out: Path) -> None:
    """One rank of the timed job (run under torchrun)."""
    import torch

    from abft_lens import distributed
    from abft_lens.data import load_dataset, split_pools
    from abft_lens.heads import HeadScoreConfig, accumulate_head_statistics
    from abft_lens.models import load_model
    from abft_lens.prompts import build_prompts

    with distributed.process_group():
        model = load_model("smollm2-135m")
        dataset = load_dataset("sst2")
        prompts = build_prompts(model.tokenizer, dataset, split_pools(dataset, seed=42).train, n_prompts=n_prompts,
                                k=4, seed=42, max_length=model.cfg.n_ctx)
        shard = distributed.shard_batches(len(prompts), batch_size)
        distributed.barrier()
        started = time.perf_counter()
        stats = accumulate_head_statistics(model, prompts, HeadScoreConfig(batch_size=batch_size), indices=shard,
                                           progress=False)
        stats = distributed.all_reduce_head_statistics(stats)
        distributed.barrier()
        seconds = time.perf_counter() - started
        if distributed.is_main_process():
            out.write_text(json.dumps({
                "scoring_seconds": seconds, "prompts_scored": stats.n_prompts,
                "world_size": distributed.get_world_size(), "torch_threads_per_rank": torch.get_num_threads(),
                "mean_prompt_tokens": sum(len(p.tokens) for p in prompts.prompts) / len(prompts),
            }))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(ranks: int, n_prompts: int, batch_size: int, threads: int | None = None) -> dict:
    out = RESULTS / f".worker_{ranks}.json"
    thread_env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, "--worker",
               "--n-prompts", str(n_prompts), "--batch-size", str(batch_size), "--worker-out", str(out)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **thread_env})
    job_seconds = time.perf_counter() - started
    record = json.loads(out.read_text())
    out.unlink()
    record.update(ranks=ranks, n_prompts=n_prompts, batch_size=batch_size, job_seconds=round(job_seconds, 1),
                  prompts_per_s=record["prompts_scored"] / record["scoring_seconds"],
                  load_average_before=[round(x, 2) for x in load_before],
                  load_average_after=[round(x, 2) for x in os.getloadavg()], cpu_count=os.cpu_count(),
                  command=f".venv/bin/python benchmarks/bench_distributed.py --n-prompts {n_prompts} "
                          f"--batch-size {batch_size} --ranks {ranks if threads is None else f'{ranks}x{threads}'}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ranks", default="1,2,1x1",
                        help="comma-separated rank counts; RxT pins T torch threads per rank (1x1: one rank, "
                             "one thread, the per-process speed of a rank of the 2-rank job)")
    parser.add_argument("--fresh", action="store_true", help="ignore saved results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.n_prompts, args.batch_size, args.worker_out)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    records = {}
    for spec in args.ranks.split(","):
        ranks, _, threads = spec.partition("x")
        path = RESULTS / f"ranks{spec}_n{args.n_prompts}_b{args.batch_size}.json"
        if path.exists() and not args.fresh:
            print(f"{spec} rank(s): saved result {path}")
        else:
            record = run(int(ranks), args.n_prompts, args.batch_size, int(threads) if threads else None)
            path.write_text(json.dumps(record, indent=2) + "\n")
        records[spec] = json.loads(path.read_text())
    print(f"\nfind-heads scoring, smollm2-135m, sst2, {args.n_prompts} prompts, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    print("ranks  threads/rank  prompts/s  scoring s  job s (with loads)  load avg (1 min) before")
    for spec, r in records.items():
        print(f"{r['ranks']:>5}  {r['torch_threads_per_rank']:>12}  {r['prompts_per_s']:>9.2f}  {r['scoring_seconds']:>9.1f}"
              f"  {r['job_seconds']:>18.1f}  {r['load_average_before'][0]:>6.2f}")
    summary = {"records": list(records.values())}
    for base in ("1", "1x1"):
        if base in records and "2" in records:
            ratio = records["2"]["prompts_per_s"] / records[base]["prompts_per_s"]
            print(f"2 ranks / {base} throughput: {ratio:.2f}x")
            summary[f"ratio_2_over_{base}"] = ratio
    (RESULTS / f"summary_n{args.n_prompts}_b{args.batch_size}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
