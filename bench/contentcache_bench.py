"""ContentCache benchmark against local redis-server processes started here (prints numbers).

1. Value size: GET latency (p50/p99, one client, sequential) and throughput (16 concurrent
   GETs) for 64 KiB, 256 KiB, 1 MiB and 4 MiB values, so the block size can be chosen from data.
2. Batched reads of one 8 MiB run (8 x 1 MiB, the read path's max_run) through
   RedisContentCache.get_blocks: single server; 3-master cluster without a hash tag (clip's
   keys, spread over masters); and a cluster with a per-layer hash tag (one slot, one MGET).
3. Where one layer's blocks land in the cluster with and without a hash tag.

Run: .venv/bin/python bench/contentcache_bench.py [--mib-per-size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from integration.harness.redis import RedisClusterServers, RedisServer
from snapshotter.contentcache import ContentCacheSettings, block_key
from snapshotter.contentcache.redis_backend import RedisContentCache

SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
LAYER = "sha256:" + "5a" * 32


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _concurrent_gets(client: Redis, keys: list[str], concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(key: str) -> None:
        async with sem:
            await client.get(key)

    await asyncio.gather(*(one(k) for k in keys))


async def value_sizes(url: str, mib: int) -> None:
    client = Redis.from_url(url)
    print(f"{'value':>8} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'seq MB/s':>9} {'16x MB/s':>9}")
    for size in SIZES:
        n = max(16, (mib << 20) // size)
        payload = os.urandom(size)
        keys = [f"bench:{size}:{i}" for i in range(n)]
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.set(k, payload)
        await pipe.execute()
        lat: list[float] = []
        t0 = time.perf_counter()
        for k in keys:
            t = time.perf_counter()
            await client.get(k)
            lat.append(time.perf_counter() - t)
        seq = n * size / (time.perf_counter() - t0) / 1e6
        t0 = time.perf_counter()
        await _concurrent_gets(client, keys, 16)
        par = n * size / (time.perf_counter() - t0) / 1e6
        print(f"{size >> 10:>6}Ki {n:>5} {_pct(lat, .5) * 1e3:>8.3f} {_pct(lat, .99) * 1e3:>8.3f}"
              f" {seq:>9.0f} {par:>9.0f}")
        await client.delete(*keys)
    await client.aclose()


async def batched(label: str, url: str, cluster: bool, tagged: bool, rounds: int) -> None:
    """8 x 1 MiB get_blocks through RedisContentCache (or a tagged-key MGET for comparison)."""
    blocks = list(range(8))
    payload = os.urandom(1 << 20)
    if tagged:
        client = RedisCluster.from_url(url)
        keys = [f"clip:v1:{{{LAYER[7:]}}}:b{1 << 20}:{b}" for b in blocks]
        for k in keys:
            await client.set(k, payload)

        async def get() -> None:
            await client.mget(keys)
    else:
        cache = RedisContentCache(ContentCacheSettings(
            url=url, cluster=cluster, timeout_seconds=2.0))
        for b in blocks:
            await cache.put_block(LAYER, b, payload)
        await cache.flush(10)

        async def get() -> None:
            values = await cache.get_blocks(LAYER, blocks)
            assert all(v is not None for v in values), cache.health()
    lat: list[float] = []
    for _ in range(rounds):
        t = time.perf_counter()
        await get()
        lat.append(time.perf_counter() - t)
    mbps = 8 * rounds / sum(lat) * 1.048576
    print(f"{label:<34} p50 {statistics.median(lat) * 1e3:7.2f} ms  p99 "
          f"{_pct(lat, .99) * 1e3:7.2f} ms  {mbps:6.0f} MB/s")
    if tagged:
        await client.aclose()
    else:
        await cache.close()


def spread(servers: RedisClusterServers, nblocks: int) -> None:
    plain = Counter(servers.node_for(block_key(LAYER, b)).port for b in range(nblocks))
    tagged_key = f"clip:v1:{{{LAYER[7:]}}}:b1048576:0"
    print(f"{nblocks} blocks of one layer per master: no tag {sorted(plain.values())}, "
          f"per-layer tag [all {nblocks} on :{servers.node_for(tagged_key).port}]")


async def main_async(args: argparse.Namespace) -> None:
    with RedisServer() as server:
        print("== GET by value size (single redis-server, loopback)")
        await value_sizes(server.url(), args.mib_per_size)
        print("\n== get_blocks of one 8 MiB run (8 x 1 MiB)")
        await batched("single server, MGET", server.url(), False, False, args.rounds)
    with RedisClusterServers() as cluster:
        await batched("cluster, no tag (mget_nonatomic)", cluster.url(), True, False, args.rounds)
        await batched("cluster, per-layer tag (MGET)", cluster.url(), True, True, args.rounds)
        print()
        spread(cluster, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib-per-size", type=int, default=64, help="MiB stored per value size")
    parser.add_argument("--rounds", type=int, default=50, help="batched reads per variant")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
