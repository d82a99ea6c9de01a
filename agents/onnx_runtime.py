"""ONNX Runtime path: the same agents and samplers, run through onnxruntime's CPU provider.

``make_agent(spec, env, checkpoint=..., runtime="onnx")`` builds an ``OnnxDiffusionAgent``. What runs in ONNX:

* ``encoder.onnx``: raw observation history -> the backbone's global condition (normalisation, and the RGB
  encoder where the policy has cameras).
* ``unet.onnx``: one denoiser call (one NFE), ``eps = unet(x, t, cond)``.
* ``predictor.onnx`` / ``predictor_noprev.onnx``: STEP's predictor with and without the previous chunk.
* ``chunk_<method>_<k>[_noprev].onnx`` for DDIM-k and the STEP variants: the whole chunk computation as ONE
  graph (encoder, predictor, warm start, the k U-Net calls and DDIM updates, unnormalisation of the executed
  actions), so a replan is one ``session.run``. The Python bookkeeping that costs more than the predictor
  at batch 1 (per-op dispatch of the sampler loop, the warm-start arithmetic, unnormalising) is gone.

Random numbers stay outside the graphs: the agent draws the same noise from the same per-row generators in
the same order as the torch agent and passes it in, so for one seed the torch and ONNX agents produce the
same chunks within float tolerance (``tests/test_onnx_runtime.py``). DDPM-100 and DPM-Solver++ use the
Python samplers with ``unet.onnx`` as the denoiser (DDPM draws fresh noise at every step, and DPM-Solver++'s
multistep state lives in diffusers' scheduler), which are the same samplers as the torch path.

Every file carries metadata (``format``, the task, a digest of the policy's and the predictor's weights,
the method and step count for a chunk graph); a file exported from another policy is refused with a
one-line error. ``step export --onnx`` writes the files beside a release checkpoint (``<out>/onnx``); when an
agent needs a graph that is not there it exports it into a temporary folder for this process.

Threads: ``intra_op_num_threads`` follows torch's thread count (1 for batch-1 latency), one inter-op thread,
sequential execution, all graph optimisations. An agent's batch size is fixed for its life, so its sessions pin the
graphs' symbolic ``batch`` axis to it: ORT then folds the shape arithmetic of every reshape, the attention scale and
(in a chunk graph, whose timesteps are constants) the timestep embedding at load time (the predictor: 204 -> 116
nodes; ``chunk_step_2``: 950 -> 781). The bare ``unet.onnx`` that ``step latency`` times as one NFE is opened the
same way.

The replan path runs no torch op besides the noise draws (which must come from the torch generators, to give the
torch agent's noise) and one ``from_numpy`` of the chunk: feeds are numpy views, the stall detector's delta and
(lam, sigma) are numpy, the noise is drawn into preallocated buffers. At batch 1 a dozen small torch ops between two
ORT runs cost far more than their own few microseconds (measured: 0.1-0.4 ms per replan on a loaded 2-core machine).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from agents.backbone import Backbone
from agents.diffusion_agents import DiffusionAgent
from agents.predictor import Predictor, shift_chunk
from agents.samplers import DDIMSampler, ScheduleConfig, WarmStart
from agents.stall import StallDetector, chunk_delta
from step_envs.dataset import ENV_STATE_KEY, IMAGE_PREFIX, STATE_KEY

ONNX_FORMAT = "step-onnx"
ONNX_VERSION = 1
OPSET = 17
RUNTIMES = ("torch", "onnx")
DEFAULT_EXPORT_METHODS = ("ddim:1", "ddim:2", "ddim:4", "step:1", "step:2", "step:4")


# ----------------------------------------------------------------------------- identities
def weights_digest(module: nn.Module | None) -> str:
    """A digest of a module's weights and buffers (float32 values): which network an ONNX file was made from."""
    if module is None:
        return "none"
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def obs_inputs(backbone: Backbone) -> list[tuple[str, str]]:
    """(ONNX input name, history key) of the observation inputs, in graph order."""
    feats = backbone.features
    names = [("state", STATE_KEY)]
    if feats.env_state_dim:
        names.append(("env_state", ENV_STATE_KEY))
    names += [(f"image_{cam}", IMAGE_PREFIX + cam) for cam in feats.cameras]
    return names


def graph_name(method: str, steps: int, noprev: bool = False) -> str:
    return f"chunk_{method}_{steps}{'_noprev' if noprev else ''}"


# ----------------------------------------------------------------------------- export modules
class _Encoder(nn.Module):
    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.keys = [key for _, key in obs_inputs(backbone)]

    def forward(self, *obs: Tensor) -> Tensor:
        return self.backbone.global_cond(dict(zip(self.keys, obs)))


class _UNet(nn.Module):
    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.backbone.denoise(x, t, cond)


class _Predictor(nn.Module):
    def __init__(self, predictor: Predictor, with_prev: bool):
        super().__init__()
        self.predictor, self.with_prev = predictor, with_prev

    def forward(self, cond: Tensor, *prev: Tensor) -> Tensor:
        return self.predictor(cond, prev[0] if self.with_prev else None)


class _Chunk(nn.Module):
    """One replan as one graph: observation history (+ previous chunk, noise) -> (chunk, executed actions).

    kind "ddim": x = noise, k DDIM steps.  kind "step": warm start from the predictor (``source`` predictor:
    f(o, A_prev); noprev: f(o); temporal: A_prev shifted by Ta), x_k = lam a pred + b noise + sigma xi, k DDIM
    steps; k = 0: the predictor's chunk as it is. The arithmetic is the torch agent's own code, traced.
    """

    def __init__(self, backbone: Backbone, predictor: Predictor | None, kind: str, steps: int, source: str = "predictor"):
        super().__init__()
        self.backbone, self.predictor = backbone, predictor
        self.kind, self.steps, self.source = kind, steps, source
        self.keys = [key for _, key in obs_inputs(backbone)]
        self.sampler = DDIMSampler(steps, ScheduleConfig.from_policy(backbone.cfg)) if steps else None
        self.warm = WarmStart(self.sampler) if (kind == "step" and self.sampler is not None) else None

    def input_names(self) -> list[str]:
        names = [name for name, _ in obs_inputs(self.backbone)]
        if self.kind == "step" and self.source in ("predictor", "temporal"):
            names.append("prev")
        if self.kind == "ddim":
            names.append("noise")
        elif self.steps:
            names += ["noise", "xi", "lam", "sigma"]
        return names

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        n = len(self.keys)
        cond = self.backbone.global_cond(dict(zip(self.keys, inputs[:n])))
        rest = list(inputs[n:])
        pc = self.backbone.cfg
        if self.kind == "ddim":
            x = self.sampler.run(self.backbone.denoise, cond, rest[0])
        else:
            prev = rest.pop(0) if self.source in ("predictor", "temporal") else None
            if self.source == "temporal":
                pred = shift_chunk(prev, pc.n_action_steps)
            else:
                pred = self.predictor(cond, prev)
            if self.steps == 0:
                x = pred
            else:
                noise, xi, lam, sigma = rest
                x = self.sampler.run(self.backbone.denoise, cond, self.warm.initial(pred, noise, lam, sigma, xi))
        start = pc.n_obs_steps - 1
        actions = self.backbone.unnormalize_action(x[:, start : start + pc.n_action_steps])
        return x, actions


# ----------------------------------------------------------------------------- export
def _example_inputs(backbone: Backbone, names: list[str], batch: int = 1) -> tuple[Tensor, ...]:
    feats, pc = backbone.features, backbone.cfg
    g = torch.Generator().manual_seed(0)
    out = []
    for name in names:
        if name == "state":
            out.append(torch.rand(batch, pc.n_obs_steps, feats.state_dim, generator=g))
        elif name == "env_state":
            out.append(torch.rand(batch, pc.n_obs_steps, feats.env_state_dim, generator=g))
        elif name.startswith("image_"):
            h, w, c = feats.cameras[name[len("image_"):]]
            out.append(torch.randint(0, 256, (batch, pc.n_obs_steps, c, h, w), generator=g, dtype=torch.uint8))
        elif name in ("prev", "noise", "xi", "x"):
            out.append(torch.randn(batch, pc.horizon, feats.action_dim, generator=g))
        elif name in ("lam", "sigma"):
            out.append(torch.ones(batch, 1, 1))
        elif name == "t":
            out.append(torch.full((batch,), pc.num_train_timesteps // 2, dtype=torch.long))
        elif name == "cond":
            with torch.no_grad():
                enc = _Encoder(backbone)
                obs = _example_inputs(backbone, [n for n, _ in obs_inputs(backbone)], batch)
                out.append(enc(*obs))
        else:
            raise KeyError(name)
    return tuple(out)


def _export(module: nn.Module, inputs: list[str], outputs: list[str], example: tuple, path: Path, meta: dict) -> Path:
    import onnx

    from step_envs.safe_io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".export")
    module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.TransformerEncoderLayer's fused inference kernel has no ONNX export: trace the plain ops instead
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python floats/ints fixed in the graph (intended)
            torch.onnx.export(module, example, str(tmp), input_names=inputs, output_names=outputs, opset_version=OPSET,
                              dynamic_axes={name: {0: "batch"} for name in inputs + outputs}, dynamo=False,
                              do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(tmp))
    tmp.unlink()
    meta = {"format": ONNX_FORMAT, "version": ONNX_VERSION, "inputs": inputs, "outputs": outputs,
            "torch": torch.__version__, **meta}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    atomic_write(path, lambda p: onnx.save(model, str(p)))
    return path


class OnnxExporter:
    """Writes the ONNX files of one policy (+ predictor) into a folder, each with its identity metadata."""

    def __init__(self, backbone: Backbone, predictor: Predictor | None, task: str | None = None):
        self.backbone, self.predictor, self.task = backbone.eval(), predictor, task
        self.identity = {"task": task, "policy_digest": weights_digest(backbone),
                         "predictor_digest": weights_digest(predictor)}

    def export(self, folder, name: str) -> Path:
        """``encoder``, ``unet``, ``predictor``, ``predictor_noprev`` or a ``graph_name(...)``."""
        folder = Path(folder)
        bb, pred = self.backbone, self.predictor
        obs = [n for n, _ in obs_inputs(bb)]
        meta = {**self.identity, "graph": name}
        if name == "encoder":
            return _export(_Encoder(bb), obs, ["cond"], _example_inputs(bb, obs), folder / "encoder.onnx", meta)
        if name == "unet":
            names = ["x", "t", "cond"]
            return _export(_UNet(bb), names, ["eps"], _example_inputs(bb, names), folder / "unet.onnx", meta)
        if name in ("predictor", "predictor_noprev"):
            self._need_predictor(name)
            names = ["cond", "prev"] if name == "predictor" else ["cond"]
            return _export(_Predictor(pred, name == "predictor"), names, ["pred"], _example_inputs(bb, names),
                           folder / f"{name}.onnx", meta)
        if not name.startswith("chunk_"):
            raise ValueError(f"Unknown ONNX graph {name!r}.")
        body = name[len("chunk_"):]
        noprev = body.endswith("_noprev")
        method, _, steps = body.removesuffix("_noprev").rpartition("_")
        kind, _, source = method.partition("-")
        source = "noprev" if noprev else (source or "predictor")
        if kind == "step" and source != "temporal":
            self._need_predictor(name)
        module = _Chunk(bb, pred, kind, int(steps), source)
        names = module.input_names()
        meta.update(method=method, steps=int(steps), source=source)
        return _export(module, names, ["chunk", "actions"], _example_inputs(bb, names), folder / f"{name}.onnx", meta)

    def _need_predictor(self, name: str) -> None:
        if self.predictor is None:
            raise ValueError(f"ONNX graph {name!r} needs STEP's predictor; this checkpoint has none.")


def graphs_for(method: str, steps: int, warm_source: str = "predictor", first_call: str = "predictor") -> list[str]:
    """The ONNX files an agent ``method:steps`` runs (besides ``encoder`` / ``unet`` for DDPM, DPM-Solver++)."""
    if method in ("ddpm", "dpmsolver"):
        return ["encoder", "unet"]
    if method == "ddim":
        return [graph_name("ddim", steps), "unet"]
    if method != "step":
        raise ValueError(f"The ONNX runtime serves ddpm, ddim, dpmsolver and step variants, not {method!r}.")
    graphs = ["unet"]
    if warm_source == "predictor":
        graphs.append(graph_name("step", steps))
        first_noise = first_call == "noise"
    elif warm_source == "spatial":
        graphs.append(graph_name("step", steps, noprev=True))
        first_noise = False
    else:  # temporal: first call of an episode from noise
        graphs.append(graph_name("step-temporal", steps))
        first_noise = True
    if warm_source == "predictor" and not first_noise:
        graphs.append(graph_name("step", steps, noprev=True))
    if first_noise:
        graphs.append(graph_name("ddim", steps))
    return graphs


def export_onnx(checkpoint, out=None, methods=DEFAULT_EXPORT_METHODS) -> dict:
    """``step export --onnx``: every ONNX file of a checkpoint (and its predictor) into ``out`` (default <ckpt>/onnx)."""
    from agents.checkpoint import find_predictor, load_policy, load_predictor
    from agents.factory import parse_method, split_method

    backbone, config = load_policy(checkpoint)
    path = find_predictor(checkpoint)
    predictor = load_predictor(path, backbone)[0] if path is not None else None
    exporter = OnnxExporter(backbone, predictor, task=config["task"])
    out = Path(out) if out is not None else Path(checkpoint) / "onnx"
    names = ["encoder", "unet"] + (["predictor", "predictor_noprev"] if predictor is not None else [])
    skipped = []
    for spec in methods:
        name, steps = parse_method(spec)
        method, source = split_method(name)
        if method == "step" and predictor is None and source != "temporal":
            skipped.append(spec)  # a policy without a predictor (yet): its DDIM graphs are still useful
            continue
        names += [g for g in graphs_for(method, steps if steps is not None else 2, source) if g not in names]
    written = [str(exporter.export(out, n)) for n in names]
    report = {"out": str(out), "files": written, **exporter.identity}
    if skipped:
        report["skipped (no predictor)"] = skipped
    return report


# ----------------------------------------------------------------------------- runtime
def session_options(threads: int, batch: int | None = None):
    """CPU session options; ``batch``: pin the graphs' symbolic batch axis (the agent's fixed batch size)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if batch is not None:
        so.add_free_dimension_override_by_name("batch", int(batch))
    return so


def read_metadata(path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in model.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


class OnnxGraphs:
    """The ONNX sessions of one agent: found in ``onnx_dir`` (checked against this policy) or exported."""

    def __init__(self, backbone: Backbone, predictor: Predictor | None, onnx_dir=None, threads: int | None = None,
                 task: str | None = None, batch: int | None = None):
        self.exporter = OnnxExporter(backbone, predictor, task)
        self.onnx_dir = Path(onnx_dir) if onnx_dir is not None else None
        self.threads = threads or torch.get_num_threads()
        self.batch = batch  # None: the graphs' dynamic batch axis stays dynamic
        self.sessions: dict = {}
        self.inputs: dict[str, list[str]] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _path(self, name: str) -> Path:
        if self.onnx_dir is not None and (self.onnx_dir / f"{name}.onnx").exists():
            path = self.onnx_dir / f"{name}.onnx"
            self.check(path, name)
            return path
        if self.onnx_dir is not None and self.onnx_dir.exists() and any(self.onnx_dir.glob("*.onnx")):
            print(f"step: {self.onnx_dir} has no {name}.onnx; exporting it for this run", file=sys.stderr)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="step-onnx-")
        return self.exporter.export(self._tmp.name, name)

    def check(self, path: Path, name: str) -> None:
        """A one-line ValueError for a file that is not this policy's ``name`` graph."""
        try:
            meta = read_metadata(path)
        except Exception as err:  # onnx raises DecodeError and friends for a corrupt file
            raise ValueError(f"{path} is not a readable ONNX file ({type(err).__name__}); re-export it with "
                             f"`step export --onnx`.") from None
        ident = self.exporter.identity
        if meta.get("format") != ONNX_FORMAT:
            raise ValueError(f"{path} is not a STEP ONNX export (no 'format: {ONNX_FORMAT}' metadata).")
        if meta.get("version", 0) > ONNX_VERSION:
            raise ValueError(f"{path} was written by a newer version ({meta['version']}) of this library.")
        if meta.get("graph") != name:
            raise ValueError(f"{path} holds the graph {meta.get('graph')!r}, expected {name!r}.")
        if ident["task"] is not None and meta.get("task") not in (None, ident["task"]):
            raise ValueError(f"{path} was exported for task {meta.get('task')!r}, not {ident['task']!r}.")
        if meta.get("policy_digest") != ident["policy_digest"]:
            raise ValueError(f"{path} was exported from another policy (weights digest {meta.get('policy_digest')}, "
                             f"this policy {ident['policy_digest']}); re-export it with `step export --onnx`.")
        uses_predictor = name.startswith("predictor") or (name.startswith("chunk_step") and "temporal" not in name)
        if uses_predictor and meta.get("predictor_digest") != ident["predictor_digest"]:
            raise ValueError(f"{path} was exported with another predictor (digest {meta.get('predictor_digest')}, "
                             f"this one {ident['predictor_digest']}); re-export it with `step export --onnx`.")

    def session(self, name: str):
        if name not in self.sessions:
            import onnxruntime as ort

            path = self._path(name)
            sess = ort.InferenceSession(str(path), session_options(self.threads, self.batch),
                                        providers=["CPUExecutionProvider"])
            self.sessions[name] = sess
            self.inputs[name] = [i.name for i in sess.get_inputs()]
        return self.sessions[name]

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session(name).run(None, feeds)


# Noise draws per row fetched at once by the ONNX agent. A torch op between two ORT runs costs about 0.1 ms at
# batch 1 on the 2-core machine, far beyond its own 5 us (measured: one randn of a (16, 2) chunk before each
# chunk-graph run, 2.05 vs 1.94 ms median over 1500 alternating calls; a numpy draw 1.97), so the replan path
# makes one torch call per DRAW_BLOCK draws instead of one per draw.
DRAW_BLOCK = 64


def draws_match_in_blocks(shape) -> bool:
    """Whether one randn of (n, *shape) gives the numbers of n randn of ``shape`` from the same CPU generator (true
    when the count is a multiple of 16, torch's vectorised normal; checked here, not assumed, so that the ONNX
    agent's noise always equals the torch agent's)."""
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    together = torch.randn((3, *shape), generator=a)
    return torch.equal(together, torch.stack([torch.randn(shape, generator=b) for _ in range(3)]))


def _np(x: Tensor) -> np.ndarray:
    # Tensor.numpy() is a view, not a dispatched torch op (detach is); contiguous arrays pass through ascontiguousarray
    return np.ascontiguousarray(x.detach().numpy() if x.requires_grad else x.numpy())


class NumpyStallDetector(StallDetector):
    """The StallDetector's decisions on the ONNX graph's numpy chunks: no torch op on the replan path.

    Same delta (mean |A_t - A_{t-1}|, float32) and the same (lam, sigma) rule; ``delta`` stays a (B,) tensor (a view
    of the numpy delta) for the readers of ``agent.stall`` (``step stall-sweep``)."""

    def reset(self) -> None:
        super().reset()
        self.delta_np: np.ndarray | None = None

    def update(self, prev, cur):
        if prev is None:
            self.delta_np = self.delta = None
            return None
        if self.cfg.align == "index":
            self.delta_np = np.abs(np.asarray(cur) - np.asarray(prev)).mean(axis=(1, 2), dtype=np.float32)
        else:  # "time" (an ablation): the torch definition, on views of the arrays
            self.delta_np = chunk_delta(torch.from_numpy(np.asarray(prev)), torch.from_numpy(np.asarray(cur)),
                                        self.shift, self.cfg.align).numpy()
        self.delta = torch.from_numpy(self.delta_np)
        return self.delta

    def coefficients_into(self, lam: np.ndarray, sigma: np.ndarray) -> None:
        """Write (lam, sigma) of the next warm start into the (B, 1, 1) float32 arrays ``lam`` and ``sigma``."""
        cfg = self.cfg
        if not cfg.enabled or self.delta_np is None:
            lam.fill(cfg.lam)
            sigma.fill(cfg.sigma)
            return
        stalled = self.delta_np < cfg.eps
        lam[:, 0, 0] = np.where(stalled, cfg.lam_stall, cfg.lam)
        sigma[:, 0, 0] = np.where(stalled, cfg.sigma_stall, cfg.sigma)


class OnnxDiffusionAgent(DiffusionAgent):
    """A DiffusionAgent whose chunks come from ONNX Runtime; same API, same random streams, same samplers."""

    runtime = "onnx"

    def __init__(self, backbone: Backbone, cfg, action_space, batch_size: int | None = None,
                 predictor: Predictor | None = None, onnx_dir=None, threads: int | None = None, task: str | None = None):
        if cfg.method not in ("ddpm", "ddim", "dpmsolver", "step"):
            raise ValueError(f"The ONNX runtime serves ddpm, ddim, dpmsolver and step variants, not {cfg.method!r}.")
        if cfg.warm_start_t is not None:  # its step graphs bake in the paper's timesteps
            raise ValueError("The ONNX runtime runs STEP's paper warm start only; 'step@t' variants need runtime='torch'.")
        super().__init__(backbone, cfg, action_space, batch_size=batch_size, predictor=predictor)
        self.graphs = OnnxGraphs(backbone, predictor if cfg.method == "step" else None, onnx_dir, threads, task,
                                 batch=self.rows)
        self.obs_names = obs_inputs(backbone)
        self.needed = graphs_for(cfg.method, cfg.steps, cfg.warm_source, cfg.first_call)
        for name in self.needed:  # open (or export) every session now, not in the first act()
            self.graphs.session(name)
        self.nfe_calls = 0  # network evaluations run so far (for `step latency`'s NFE count)
        # The noise draws, fetched DRAW_BLOCK at a time per row (see _draw); fed to ORT as numpy views of the pool
        self._block = DRAW_BLOCK if draws_match_in_blocks(backbone.action_shape) else 1
        self._pool = torch.empty(self._block, self.rows, *backbone.action_shape)
        self._pool_np = self._pool.numpy()
        if cfg.method == "step":
            self.stall = NumpyStallDetector(cfg.stall, shift=backbone.cfg.n_action_steps)
            self._lam = np.ones((self.rows, 1, 1), np.float32)
            self._sigma = np.zeros((self.rows, 1, 1), np.float32)

    # --- pieces
    def _obs_feeds(self, history: dict[str, Tensor]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, key in self.obs_names:
            x = history[key]
            if not key.startswith(IMAGE_PREFIX) and x.dtype != torch.float32:
                x = x.float()
            feeds[name] = _np(x)
        return feeds

    def reset(self) -> None:
        super().reset()  # new generators: numbers drawn ahead from the old ones are dropped
        self._pool_left = 0

    def _draw(self) -> np.ndarray:
        """The next Gaussian draw (B, H, A), row i from generator i: what the torch agent's ``randn(shape,
        generators)`` gives, in the same order (a replan's noise, then its xi)."""
        if self._pool_left == 0:
            for row, g in enumerate(self.generators):
                self._pool[:, row] = torch.randn((self._block, *self._pool.shape[2:]), generator=g)
            self._pool_left = self._block
        draw = self._pool_np[self._block - self._pool_left]
        self._pool_left -= 1
        return draw

    def _denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.nfe_calls += 1
        eps = self.graphs.run("unet", {"x": _np(x), "t": _np(t.to(torch.long)), "cond": _np(cond)})[0]
        return torch.from_numpy(eps)

    def nfe_call(self, history: dict):
        """A zero-argument callable running one bare ``unet.onnx`` call at this agent's batch (this runtime's one
        NFE, in the same session options as the chunk graphs)."""
        cond = self.graphs.run("encoder", self._obs_feeds(history))[0] if "encoder" in self.needed else None
        if cond is None:
            cond = _np(self.backbone.global_cond(history))
        feeds = {"x": np.random.default_rng(0).standard_normal((cond.shape[0], *self.backbone.action_shape)).astype(np.float32),
                 "t": np.full((cond.shape[0],), self.backbone.cfg.num_train_timesteps // 2, dtype=np.int64), "cond": cond}
        sess = self.graphs.session("unet")
        return lambda: sess.run(None, feeds)

    def encode_call(self, history: dict):
        """A zero-argument callable running ``encoder.onnx`` once on ``history`` (the observation encoding inside
        every chunk graph, on its own)."""
        feeds = self._obs_feeds(history)
        sess = self.graphs.session("encoder")
        return lambda: sess.run(None, feeds)

    # --- one chunk
    def _infer(self, history: dict[str, Tensor]) -> tuple[Tensor, np.ndarray]:
        """(chunk (B, H, A) normalised, executed actions (B, Ta, A) raw) for one replan; updates STEP's state."""
        cfg, pc = self.cfg, self.backbone.cfg
        shape = (self.rows, *self.backbone.action_shape)
        feeds = self._obs_feeds(history)
        if cfg.method in ("ddpm", "dpmsolver"):
            cond = torch.from_numpy(self.graphs.run("encoder", feeds)[0])
            chunk = self.sampler.sample(self._denoise, cond, shape, self.generators)
            start = pc.n_obs_steps - 1
            with torch.inference_mode():
                actions = self.backbone.unnormalize_action(chunk[:, start : start + pc.n_action_steps])
            return chunk, actions.numpy()
        if cfg.method == "ddim":
            feeds["noise"] = self._draw()
            chunk, actions = self.graphs.run(graph_name("ddim", cfg.steps), feeds)
            self.nfe_calls += cfg.steps
            return torch.from_numpy(chunk), actions
        # STEP: the torch agent's plan(), with the chunk computation in one graph and the stall detector in numpy
        prev, source = self.prev_chunk, cfg.warm_source
        prev_np = None if prev is None else _np(prev)
        if prev is None and (cfg.first_call == "noise" or source == "temporal") and cfg.steps:
            feeds["noise"] = self._draw()
            name = graph_name("ddim", cfg.steps)
        else:
            noprev = source == "spatial" or (source == "predictor" and prev is None)
            name = graph_name("step" if source != "temporal" else "step-temporal", cfg.steps, noprev=noprev)
            if not noprev:
                feeds["prev"] = prev_np
            if cfg.steps:
                self.stall.coefficients_into(self._lam, self._sigma)
                feeds["noise"] = self._draw()
                feeds["xi"] = self._draw()  # drawn at every warm start, as the torch agent
                feeds["lam"], feeds["sigma"] = self._lam, self._sigma
        out, actions = self.graphs.run(name, feeds)
        self.nfe_calls += cfg.steps
        self.stall.update(prev_np, out)
        chunk = torch.from_numpy(out)
        self.prev_chunk = chunk
        return chunk, actions

    def _replan(self) -> None:
        chunk, actions = self._infer(self.history)
        self.last_chunk = chunk
        self.cache = np.clip(actions, self.low, self.high).astype(np.float32)
        self.cache_index = 0
        self.n_replans += 1

    def chunk(self, obs_history: dict[str, Tensor]) -> Tensor:
        return self._infer(obs_history)[0]

    def count_nfe(self, history: dict, calls: int) -> float:
        """Mean network calls per ``chunk`` (what the torch path counts with a U-Net hook)."""
        before = self.nfe_calls
        for _ in range(calls):
            self.chunk(history)
        return (self.nfe_calls - before) / calls
