"""``step sweep SPEC.yaml``: bench cells (task x method x seed block x setting) as Ray tasks, resumable, merged.

A sweep file (``configs/sweeps/*.yaml``, fields of ``SweepSpec``) names tasks with their checkpoints, method
specs, seed blocks and an optional grid of agent settings. Each cell is one Ray task:

- a rollout cell (task, setting, method, seed block) returns ``agents.bench.rollout_row`` for its seeds with the
  per-episode results;
- a latency cell (task, method) returns ``agents.bench.bench_latency`` for one method. It asks Ray for every CPU of
  a node, so no rollout runs beside it (parallel rollouts would distort the timing).

The driver writes each finished cell to ``<out>/cells/<cell-id>.json`` (``atomic_write``) as soon as Ray hands it
back, so a killed driver or worker loses only the cells in flight. A re-run skips every cell whose file holds a
result with the cell's fingerprint (checkpoint file hashes, method, setting, seeds, wave width, max_steps, latency
settings, code version) and runs the rest; failed cells are recorded with their error and retried on the next run.
Finally the driver merges, per task and setting, the blocks' episodes into bench rows (``summarize`` over all
episodes, so success and reward equal one ``step bench`` over the same seeds) and writes ``results.json``,
``results.md`` and ``pareto.png`` with bench's own functions, which ``step table`` reads.

Equal to ``step bench`` means equal per episode, not only in distribution: every episode must get the same noise
(agents seed row ``i`` of a wave with ``seed + i``), the same batch width and the same torch thread count (both change
the network's output in the last bits, and closed-loop episodes then drift apart). So cells run waves of
``W = min(num_envs, episodes of the task)`` seeds, like ``step bench --num-envs num_envs``, every block must start a
whole number of waves after the first seed, and a rollout cell runs ``int(cpus_per_cell)`` torch threads: the rows
equal ``OMP_NUM_THREADS=<that> step bench --num-envs <num_envs>`` over the same seeds.

Without an address, ``run_sweep`` starts a local Ray instance on this machine's cores (dashboard off, its files in
a temporary folder), or uses the Ray connection the calling process already holds; with one it joins that cluster.
Every node needs the project installed and the checkpoints at the same path (a worker refuses a checkpoint whose
files differ from the driver's, and a code version that differs from the driver's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from agents.config_files import build_config, option, validate_fields
from agents.factory import DEFAULT_METHODS, parse_method
from step_envs.safe_io import atomic_write, fault_point, folder_lock
from step_envs.seeds import EVAL_SEEDS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTING = "default"
# make_agent's own arguments, which a grid may not set
_RESERVED_AGENT_ARGS = {"name", "method", "steps", "env", "task", "checkpoint", "seed", "backbone", "predictor_model"}


@dataclass
class SweepSpec:
    """A sweep file. Seeds: ``seeds: {start, episodes, block}`` or an explicit ``seed_blocks: [[start, count], ...]``."""

    tasks: dict  # task -> checkpoint folder (null: the committed one); a list of task names means all committed
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: dict | None = None
    seed_blocks: tuple | None = None
    # agent settings, each a list of values; the sweep runs their product (dotted keys set a nested field,
    # e.g. stall.sigma). Results of setting s go to <out>/<task>/<s>/ (without a grid: <out>/<task>/).
    grid: dict = field(default_factory=dict)
    num_envs: int | None = None  # wave width; default: the first block's size (image policies: at most camera_num_envs)
    max_steps: int | None = None  # cap episodes (smoke runs only)
    latency_calls: int = 50
    latency_threads: int = 1
    cpus_per_cell: float = 1.0  # Ray resources of a rollout cell
    gpus_per_cell: float = 0.0  # the agents here run on the CPU; set it for an agent that runs on a GPU
    out: str | None = None  # default output folder (--out overrides); default results/sweeps/<file stem>

    def __post_init__(self):
        if isinstance(self.tasks, (list, tuple)):
            self.tasks = {name: None for name in self.tasks}
        if not isinstance(self.tasks, dict) or not self.tasks:
            raise ValueError("tasks: give a mapping task: checkpoint (or a list of task names).")
        self.methods = tuple(self.methods)
        if not self.methods:
            raise ValueError("methods is empty.")
        for spec in self.methods:
            parse_method(spec)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a spec twice: {list(self.methods)}.")
        for name, minimum in (("latency_calls", 1), ("latency_threads", 1), ("num_envs", 1), ("max_steps", 1)):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {value}.")
        if self.cpus_per_cell <= 0 or self.gpus_per_cell < 0:
            raise ValueError("cpus_per_cell must be > 0 and gpus_per_cell >= 0.")
        if not isinstance(self.grid, dict):
            raise ValueError("grid: give a mapping setting: [values, ...].")


@dataclass(frozen=True)
class Cell:
    kind: str  # "rollout" or "latency"
    task: str
    method: str
    setting: str = DEFAULT_SETTING  # label of the agent settings (rollout cells)
    seed_start: int = 0
    episodes: int = 0

    @property
    def id(self) -> str:
        method = self.method.replace(":", "-")
        if self.kind == "latency":
            return f"{self.task}.latency.{method}"
        return f"{self.task}.{self.setting}.{method}.seeds{self.seed_start}-{self.seed_start + self.episodes - 1}"


# ------------------------------------------------------------------ the sweep file
def load_spec(path: str | Path) -> SweepSpec:
    """A SweepSpec from YAML; ValueError (one line) for unknown keys and bad values."""
    return build_config(SweepSpec, path)


def seed_blocks(spec: SweepSpec) -> list[tuple[int, int]]:
    """The (start, count) blocks, sorted; refused when they overlap, leave a gap or leave the evaluation seeds."""
    if (spec.seeds is None) == (spec.seed_blocks is None):
        raise ValueError("Give exactly one of seeds: {start, episodes, block} and seed_blocks: [[start, count], ...].")
    if spec.seeds is not None:
        unknown = sorted(set(spec.seeds) - {"start", "episodes", "block"})
        if unknown or "episodes" not in spec.seeds:
            raise ValueError(f"seeds takes start, episodes and block (episodes required); got {sorted(spec.seeds)}.")
        start, episodes = int(spec.seeds.get("start", 0)), int(spec.seeds["episodes"])
        block = int(spec.seeds.get("block", episodes))
        if episodes < 1 or block < 1:
            raise ValueError("seeds: episodes and block must be at least 1.")
        blocks = [(b, min(block, start + episodes - b)) for b in range(start, start + episodes, block)]
    else:
        blocks = []
        for item in spec.seed_blocks:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, int) for v in item)):
                raise ValueError(f"seed_blocks: each block is [start, count] of integers, got {item!r}.")
            blocks.append((item[0], item[1]))
        blocks.sort()
    for start, count in blocks:
        if count < 1:
            raise ValueError(f"Seed block starting at {start} has {count} episodes; a block needs at least 1.")
        if start < EVAL_SEEDS.start or start + count > EVAL_SEEDS.stop:
            raise ValueError(f"Seed block {start}-{start + count - 1} leaves the evaluation seeds "
                             f"{EVAL_SEEDS.start}-{EVAL_SEEDS.stop - 1} (step_envs/seeds.py).")
    for (a, n), (b, m) in zip(blocks, blocks[1:]):
        if b < a + n:
            raise ValueError(f"Seed blocks {a}-{a + n - 1} and {b}-{b + m - 1} overlap (seeds {b}-{min(a + n, b + m) - 1} "
                             "would be counted twice); blocks must be disjoint.")
        if b > a + n:
            raise ValueError(f"Seed blocks {a}-{a + n - 1} and {b}-{b + m - 1} leave seeds {a + n}-{b - 1} out; a results "
                             "row covers one contiguous seed range.")
    return blocks


def wave_width(spec: SweepSpec, blocks: list[tuple[int, int]], camera_width: int | None = None) -> int:
    """Envs per wave, checked so that each episode runs in the batch slot ``step bench --num-envs`` gives it.

    Default: the first block's size, capped at ``camera_width`` (the smallest ``TaskSpec.camera_num_envs`` among the
    sweep's image policies, as ``step bench`` caps its waves: one robosuite camera env holds ~0.45 GB)."""
    first, total = blocks[0][0], sum(n for _, n in blocks)
    default = blocks[0][1] if camera_width is None else min(blocks[0][1], camera_width)
    width = min(spec.num_envs or default, total)
    for start, count in blocks:
        if (start - first) % width:
            raise ValueError(f"Seed block {start}-{start + count - 1} starts {start - first} seeds after the first, not a "
                             f"multiple of the wave width {width} (num_envs): make every block but the last a multiple of "
                             "num_envs, so that the merged rows equal one `step bench` over the same seeds.")
    return width


def grid_settings(grid: dict) -> list[tuple[str, dict]]:
    """(label, make_agent keyword arguments) for each point of the grid; [("default", {})] without one."""
    if not grid:
        return [(DEFAULT_SETTING, {})]
    allowed = _agent_keywords()
    for key, values in grid.items():
        top, _, sub = str(key).partition(".")
        if top in _RESERVED_AGENT_ARGS or top not in allowed:
            raise ValueError(f"grid: unknown agent setting {key!r}; known: {sorted(allowed)}.")
        if sub:
            _check_nested(top, sub)
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid: {key} needs a non-empty list of values, got {values!r}.")
    keys = list(grid)
    settings = []
    for values in itertools.product(*(grid[k] for k in keys)):
        kwargs: dict = {}
        for key, value in zip(keys, values):
            top, _, sub = key.partition(".")
            if sub:
                kwargs.setdefault(top, {})[sub] = value
            else:
                kwargs[top] = value
        label = ",".join(f"{k}={v}" for k, v in zip(keys, values))
        settings.append((re.sub(r"[^A-Za-z0-9._=,+-]", "_", label), kwargs))
    return settings


def _agent_keywords() -> set[str]:
    from agents.factory import make_diffusion_agent

    names = set(inspect.signature(make_diffusion_agent).parameters)
    try:  # peer methods (issue 14), when present
        from agents.peers import make_peer_agent

        names |= set(inspect.signature(make_peer_agent).parameters)
    except ImportError:
        pass
    return {n for n in names if n not in _RESERVED_AGENT_ARGS}


def _check_nested(top: str, sub: str) -> None:
    if top == "stall":
        from agents.stall import StallConfig

        known = {f.name for f in dataclasses.fields(StallConfig)}
        if sub not in known:
            raise ValueError(f"grid: stall has no field {sub!r}; known: {sorted(known)}.")


# ------------------------------------------------------------------ fingerprints
def checkpoint_hash(folder: str | Path, subfolders: tuple[str, ...] | None = ()) -> str:
    """sha256 over the files of a checkpoint that an agent loads (relative path and content).

    The folder's own files, not its logs (``*.jsonl``) nor hidden lock/commit files, and the files of
    ``subfolders`` (``None``: of every subfolder), so that e.g. a model trained into another subfolder
    does not invalidate the cells of methods that never read it.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix == ".jsonl":
            continue
        if len(rel.parts) > 1 and subfolders is not None and rel.parts[0] not in subfolders:
            continue
        h.update(str(rel).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def method_subfolders(method: str) -> tuple[str, ...] | None:
    """The checkpoint subfolders a method reads: the solvers none, STEP its predictor, any other agent all."""
    from agents.factory import DIFFUSION_METHODS, split_warm_start

    name = split_warm_start(parse_method(method)[0])[0]
    if name not in DIFFUSION_METHODS:
        return None
    return ("predictor",) if name.startswith("step") else ()


_CODE_VERSION: str | None = None


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one ("+dirty" with local changes)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("step-policy")
        except PackageNotFoundError:
            text = "unknown"
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            text += f"+{commit[:12]}" + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
        _CODE_VERSION = text
    return _CODE_VERSION


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ the plan
@dataclass
class TaskPlan:
    task: str
    checkpoint: Path
    checkpoint_given: str | None  # as the sweep file wrote it (bench's config.checkpoint)
    hashes: dict[str, str]  # method -> hash of the checkpoint files it reads
    obs_type: str


@dataclass
class Plan:
    spec: SweepSpec
    tasks: dict[str, TaskPlan]
    blocks: list[tuple[int, int]]
    width: int
    settings: list[tuple[str, dict]]
    cells: list[Cell]
    payloads: dict[str, dict]  # cell id -> what the cell runs on (its fingerprint is the hash of this)


def make_plan(spec: SweepSpec) -> Plan:
    """Every cell with its fingerprint; all input checked before any work (clear one-line errors)."""
    from agents.bench import camera_wave_cap
    from agents.checkpoint import default_checkpoint, read_policy_config
    from step_envs.registry import get_task

    blocks = seed_blocks(spec)
    settings = grid_settings(spec.grid)
    version = code_version()
    tasks: dict[str, TaskPlan] = {}
    for task, given in spec.tasks.items():
        get_task(task)
        checkpoint = Path(given) if given else default_checkpoint(task)
        if not (checkpoint / "config.json").exists():
            raise FileNotFoundError(f"No policy checkpoint at {checkpoint} (task {task}); train one with "
                                    "`step train-policy` or fix the sweep file.")
        config = read_policy_config(checkpoint)
        if config["task"] != task:
            raise ValueError(f"Checkpoint {checkpoint} was trained for task {config['task']!r}, not {task!r}.")
        parts = {method: method_subfolders(method) for method in spec.methods}
        by_parts = {p: checkpoint_hash(checkpoint, p) for p in set(parts.values())}
        tasks[task] = TaskPlan(task, checkpoint, given, {m: by_parts[p] for m, p in parts.items()}, config["obs_type"])
    caps = [camera_wave_cap(get_task(t), tp.obs_type) for t, tp in tasks.items()]
    width = wave_width(spec, blocks, min((c for c in caps if c is not None), default=None))
    cells, payloads = [], {}
    for task, tp in tasks.items():
        common = {"task": task, "checkpoint": str(tp.checkpoint), "obs_type": tp.obs_type, "code": version}
        for method in spec.methods:
            cell = Cell("latency", task, method)
            cells.append(cell)
            payloads[cell.id] = {**common, "kind": "latency", "method": method, "checkpoint_hash": tp.hashes[method],
                                 "checkpoint_parts": method_subfolders(method), "latency_calls": spec.latency_calls,
                                 "latency_threads": spec.latency_threads}
        for label, kwargs in settings:
            for method in spec.methods:
                for start, count in blocks:
                    cell = Cell("rollout", task, method, label, start, count)
                    cells.append(cell)
                    payloads[cell.id] = {**common, "kind": "rollout", "method": method, "setting": kwargs,
                                         "checkpoint_hash": tp.hashes[method],
                                         "checkpoint_parts": method_subfolders(method),
                                         "seed_start": start, "episodes": count, "num_envs": width,
                                         "max_steps": spec.max_steps, "threads": max(1, int(spec.cpus_per_cell))}
    return Plan(spec, tasks, blocks, width, settings, cells, payloads)


# ------------------------------------------------------------------ one cell (runs in a Ray worker)
_LOADED: dict = {}  # (checkpoint, hash) -> (backbone, predictor): a reused worker loads a checkpoint once


def _load(checkpoint: str, expected_hash: str, parts: list[str] | None):
    from agents.checkpoint import find_predictor, load_policy, load_predictor

    key = (checkpoint, expected_hash)
    if key not in _LOADED:
        found = checkpoint_hash(checkpoint, None if parts is None else tuple(parts))
        if found != expected_hash:
            raise RuntimeError(f"The checkpoint {checkpoint} on {socket.gethostname()} differs from the driver's "
                               f"(hash {found}, expected {expected_hash}); give every node the same files.")
        backbone, config = load_policy(checkpoint, task=None)
        predictor_path = find_predictor(checkpoint)
        predictor = load_predictor(predictor_path, backbone)[0] if predictor_path else None
        _LOADED.clear()
        _LOADED[key] = (backbone, predictor)
    return _LOADED[key]


def run_cell(payload: dict) -> dict:
    """One cell's result (a dict for its cell file); never raises: an error becomes ``status: failed``."""
    t0 = time.perf_counter()
    record = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        if code_version() != payload["code"]:
            raise RuntimeError(f"Code version {code_version()} on {socket.gethostname()} differs from the driver's "
                               f"{payload['code']}; install the same commit on every node.")
        from agents.bench import BenchConfig, bench_latency, rollout_row

        backbone, predictor = _load(payload["checkpoint"], payload["checkpoint_hash"], payload["checkpoint_parts"])
        if payload["kind"] == "latency":
            cfg = BenchConfig(task=payload["task"], methods=(payload["method"],), checkpoint=payload["checkpoint"],
                              latency_calls=payload["latency_calls"], latency_threads=payload["latency_threads"],
                              progress=False)
            record["latency"] = bench_latency(cfg, payload["task"], payload["obs_type"], backbone, predictor)[0]
        else:
            import torch

            torch.set_num_threads(payload["threads"])  # as many torch threads as the cell has CPUs
            seeds = list(range(payload["seed_start"], payload["seed_start"] + payload["episodes"]))
            cfg = BenchConfig(task=payload["task"], methods=(payload["method"],), episodes=payload["episodes"],
                              seed_start=payload["seed_start"], num_envs=payload["num_envs"],
                              checkpoint=payload["checkpoint"], max_steps=payload["max_steps"], progress=False)
            row, results = rollout_row(cfg, payload["method"], payload["task"], payload["checkpoint"], backbone,
                                       predictor, payload["obs_type"], seeds, num_envs=payload["num_envs"],
                                       agent_kwargs=payload["setting"])
            record["row"] = row
            record["per_episode"] = [dataclasses.asdict(r) for r in results]
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001 -- a cell reports any error; the sweep goes on
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    record["seconds"] = time.perf_counter() - t0
    return record


# ------------------------------------------------------------------ merging cells into bench reports
def merge_blocks(records: list[dict]) -> dict:
    """One bench row from the rollout cells of one (task, setting, method), in seed order.

    Success rate and mean max reward come from ``summarize`` over all episodes (exactly what one bench run over the
    same seeds computes); episodes and rollout seconds add up. Other rollout statistics (``nfe_per_action``, a peer
    agent's own ``stats()``) are averaged over the blocks weighted by their episodes when they differ.
    """
    from step_envs.rollout import EpisodeResult, summarize

    records = sorted(records, key=lambda r: r["row"]["seed_start"])
    results = [EpisodeResult(**e) for r in records for e in r["per_episode"]]
    seeds = [e.seed for e in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError("Seed blocks overlap: an episode would be counted twice.")
    summary = summarize(results)
    rows = [r["row"] for r in records]
    merged = dict(rows[0])
    for key in rows[0]:
        values = [row.get(key) for row in rows]
        if all(v == values[0] for v in values):
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = sum(v * row["episodes"] for v, row in zip(values, rows)) / sum(row["episodes"] for row in rows)
        else:
            merged[key] = None
    merged.update(episodes=len(results), seed_start=rows[0]["seed_start"], success_rate=summary["success_rate"],
                  mean_max_reward=summary["mean_max_reward"], rollout_seconds=sum(row["rollout_seconds"] for row in rows))
    return merged


def merge_reports(plan: Plan, records: dict[str, dict], out: Path) -> tuple[list[Path], list[str]]:
    """Write results.json / results.md / pareto.png per task and setting; (folders written, methods left out)."""
    from agents.bench import BenchConfig, add_latency, bench_report, write_report

    spec = plan.spec
    written, incomplete = [], []
    start, episodes = plan.blocks[0][0], sum(n for _, n in plan.blocks)
    for task, tp in plan.tasks.items():
        for label, _ in plan.settings:
            rows, latency, methods, seconds = [], [], [], 0.0
            for method in spec.methods:
                latency_cell = records.get(Cell("latency", task, method).id)
                blocks = [records.get(Cell("rollout", task, method, label, b, n).id) for b, n in plan.blocks]
                if latency_cell is None or any(r is None for r in blocks):
                    incomplete.append(f"{task}/{label}/{method}")
                    continue
                rows.append(merge_blocks(blocks))
                latency.append(latency_cell["latency"])
                methods.append(method)
                seconds += latency_cell["seconds"] + sum(r["seconds"] for r in blocks)
            if not rows:
                continue
            add_latency(rows, latency)
            folder = out / task if label == DEFAULT_SETTING else out / task / label
            folder.mkdir(parents=True, exist_ok=True)
            cfg = BenchConfig(task=task, methods=tuple(methods), episodes=episodes, seed_start=start,
                              num_envs=plan.width, checkpoint=tp.checkpoint_given,
                              out=str(folder), latency_calls=spec.latency_calls, latency_threads=spec.latency_threads,
                              max_steps=spec.max_steps)
            # wall_seconds: the cells' own compute time (what one `step bench` on one machine would take, roughly)
            write_report(bench_report(cfg, task, tp.checkpoint, tp.obs_type, rows, seconds), folder)
            written.append(folder)
    return written, incomplete


# ------------------------------------------------------------------ the driver
@dataclass
class SweepConfig:
    spec: str = option(help="sweep file (YAML), e.g. configs/sweeps/table2_state.yaml", cli=False)  # the positional
    out: str | None = option(None, help="output folder (default: the file's `out`, else results/sweeps/<file name>)")
    address: str | None = option(None, help="join this Ray cluster (e.g. head-node:6379); default: a local Ray "
                                            "on this machine's cores")
    num_cpus: int | None = option(None, min=1, help="CPUs of the local Ray instance, i.e. parallel 1-CPU cells "
                                                    "(default: all cores)")
    progress: bool = option(True, help="progress bar")

    def __post_init__(self):
        validate_fields(self)


def _read_cell(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or unreadable: run the cell again


def _start_ray(cfg: SweepConfig):
    """Connect to Ray; returns a function that undoes what this call set up."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from these machines
    if cfg.address is not None:
        if cfg.num_cpus is not None:
            raise ValueError("--num-cpus sizes the local Ray instance; a cluster (--address) brings its own CPUs.")
        _check_reachable(cfg.address)
        try:
            ray.init(address=cfg.address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, TimeoutError) as err:
            raise RuntimeError(f"No Ray cluster answers at {cfg.address}: {' '.join(str(err).split())[:300]}") from None
        return ray.shutdown
    if ray.is_initialized():  # the caller's own Ray session (tests, notebooks): use it and leave it running
        return lambda: None
    temp = tempfile.mkdtemp(prefix="step-ray-")  # Ray's sockets, logs and spill files, outside the repository
    ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=temp)

    def stop():
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    return stop


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at HOST:PORT (or ray://HOST:PORT)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # e.g. "auto": Ray resolves it
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise RuntimeError(f"No Ray cluster answers at {address} ({err}); start one with `ray start --head` "
                           "or drop --address for a local Ray.") from None


def _node_cpus() -> float:
    """CPUs of the largest alive node: a latency cell asks for all of them, so it runs alone on its node."""
    import ray

    return max(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive"))


def _summary_line(cell: Cell, record: dict) -> str:
    if record["status"] != "ok":
        return f"{cell.id}: FAILED: {record['error']}"
    if cell.kind == "latency":
        return f"{cell.id}: {record['latency']['latency_ms']['median']:.1f} ms ({record['seconds']:.0f} s)"
    row = record["row"]
    return (f"{cell.id}: success {row['success_rate']:.2f}, mean max reward {row['mean_max_reward']:.3f} "
            f"({record['seconds']:.0f} s)")


def run_sweep(cfg: SweepConfig) -> dict:
    """Run the cells that have no up-to-date result, then merge; returns the summary written to ``sweep.json``."""
    spec = load_spec(cfg.spec)
    plan = make_plan(spec)
    out = Path(cfg.out or spec.out or f"results/sweeps/{Path(cfg.spec).stem}")
    cells_dir = out / "cells"
    t_start = time.perf_counter()
    with folder_lock(out, "sweep"):
        cells_dir.mkdir(parents=True, exist_ok=True)
        records: dict[str, dict] = {}
        todo: list[Cell] = []
        stale = 0  # finished before, but on other inputs (checkpoint files, code, settings)
        for cell in plan.cells:
            record = _read_cell(cells_dir / f"{cell.id}.json")
            if record and record.get("status") == "ok" and record.get("fingerprint") == fingerprint(plan.payloads[cell.id]):
                records[cell.id] = record
            else:
                stale += bool(record and record.get("status") == "ok")
                todo.append(cell)
        skipped = len(records)
        failed: list[dict] = []
        cluster = {}
        if cfg.progress:
            print(f"sweep: {len(plan.cells)} cells, {skipped} already done, {len(todo)} to run "
                  f"({stale} of them done before on other inputs) -> {out}")
        if todo:
            import ray

            stop = _start_ray(cfg)
            try:
                cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
                remote = ray.remote(max_retries=2)(run_cell)  # a worker that dies is retried; an exception is not
                exclusive = {"num_cpus": _node_cpus()}
                pending = {}
                # latency first: while nothing else runs, each latency cell gets its node to itself at once
                for cell in sorted(todo, key=lambda c: c.kind != "latency"):
                    options = exclusive if cell.kind == "latency" else {"num_cpus": spec.cpus_per_cell,
                                                                       "num_gpus": spec.gpus_per_cell}
                    pending[remote.options(**options).remote(plan.payloads[cell.id])] = cell
                done_count = 0
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    cell = pending.pop(ready[0])
                    try:
                        record = ray.get(ready[0])
                    except Exception as err:  # noqa: BLE001 -- e.g. the worker died more often than it was retried
                        record = {"status": "failed", "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
                    record.update(cell=cell.id, fingerprint=fingerprint(plan.payloads[cell.id]),
                                  spec=dataclasses.asdict(cell))
                    path = cells_dir / f"{cell.id}.json"
                    atomic_write(path, lambda p, r=record: p.write_text(json.dumps(r, indent=1)))
                    fault_point("sweep-cell")  # tests: kill the driver right after the n-th cell file
                    done_count += 1
                    if record["status"] == "ok":
                        records[cell.id] = record
                    else:
                        failed.append({"cell": cell.id, "error": record["error"]})
                    if cfg.progress:
                        print(f"[{done_count}/{len(todo)}] {_summary_line(cell, record)}", flush=True)
            finally:
                stop()
        written, incomplete = merge_reports(plan, records, out)
        summary = {
            "spec": str(cfg.spec),
            "out": str(out),
            "address": cfg.address or "local",
            "cluster": cluster,
            "cells": len(plan.cells),
            "skipped": skipped,
            "ran": len(todo),
            "stale": stale,
            "failed": failed,
            "incomplete": incomplete,
            "results": [str(p) for p in written],
            "wall_seconds": time.perf_counter() - t_start,
            "code": code_version(),
        }
        atomic_write(out / "sweep.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    return summary
