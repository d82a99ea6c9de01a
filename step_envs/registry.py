"""One table of tasks: env id, entry point, horizon and the defaults the CLI needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym


@dataclass(frozen=True)
class TaskSpec:
    name: str  # short CLI name, e.g. "pusht"
    env_id: str  # Gymnasium id in the ``step`` namespace
    entry_point: str
    max_episode_steps: int  # the task's standard horizon (TimeLimit)
    fps: int  # control rate, also the dataset fps
    real_hardware: bool = False  # excluded from simulator contract tests
    kwargs: dict = field(default_factory=dict)
    # Envs batched per bench wave with cameras (None: as many as without). A MuJoCo camera env holds ~0.45 GB
    # (measured: Lift pixels_state 0.37-0.57 GB against 0.11 GB in state; most likely its GL context's copy of
    # the model's textures), so 50 of them would not fit in 24 GB. A fixed width, not one sized to the free
    # memory, keeps a bench's rows the same on every machine.
    camera_num_envs: int | None = None


def _robomimic(name: str, suite_task: str, horizon: int, control: str = "delta") -> TaskSpec:
    """A RoboMimic task on robosuite (step_envs/robomimic.py), 20 Hz; ``control="absolute"`` is the same task
    under position control (``<name>-abs``, ``step/<Task>-Abs-v0``)."""
    kwargs = {"task": suite_task} if control == "delta" else {"task": suite_task, "control": control}
    suffix = "" if control == "delta" else "-Abs"
    return TaskSpec(name=name, env_id=f"step/{suite_task}{suffix}-v0", entry_point="step_envs.robomimic:RoboMimicEnv",
                    max_episode_steps=horizon, fps=20, kwargs=kwargs, camera_num_envs=10)


def _so101(task: str, id_task: str, real: bool) -> TaskSpec:
    """An SO-ARM101 task (hardware/so101_env.py): 30 Hz like LeRobot recording, 450 steps = 15 s per episode;
    the real arm (``real``) or its MuJoCo twin (``-sim``)."""
    return TaskSpec(name=f"so101-{task}" + ("" if real else "-sim"),
                    env_id=f"step/SO101-{id_task}" + ("" if real else "-Sim") + "-v0",
                    entry_point="hardware.so101_env:SO101Env", max_episode_steps=450, fps=30, real_hardware=real,
                    kwargs={"task": task, "robot": "real" if real else "twin"})


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec(name="pusht", env_id="step/PushT-v0", entry_point="step_envs.pusht:PushTEnv", max_episode_steps=300,
             fps=10),
    _robomimic("lift", "Lift", 400),
    _robomimic("can", "Can", 400),
    _robomimic("square", "Square", 400),
    _robomimic("transport", "Transport", 700),
    _robomimic("toolhang", "ToolHang", 700),
    # The same tasks under position control (Diffusion Policy's abs_action), where the delta backbones fall short.
    _robomimic("square-abs", "Square", 400, control="absolute"),
    _robomimic("transport-abs", "Transport", 700, control="absolute"),
    _robomimic("toolhang-abs", "ToolHang", 700, control="absolute"),
    # ManiSkill3 StackCube-v1 (step_envs/maniskill.py), 20 Hz; 200 steps (ManiSkill's 50 is an RL budget).
    TaskSpec(name="stackcube", env_id="step/StackCube-v0", entry_point="step_envs.maniskill:ManiSkillStackCubeEnv",
             max_episode_steps=200, fps=20),
    _so101("pickplace", "PickPlace", real=False),
    _so101("stackcube", "StackCube", real=False),
    _so101("pickplace", "PickPlace", real=True),
    _so101("stackcube", "StackCube", real=True),
)}


def register_all() -> None:
    for spec in TASKS.values():
        if spec.env_id in gym.registry:
            continue
        gym.register(
            id=spec.env_id,
            entry_point=spec.entry_point,
            max_episode_steps=spec.max_episode_steps,
            kwargs=dict(spec.kwargs),
        )


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def task_for_env_id(env_id: str) -> TaskSpec:
    for spec in TASKS.values():
        if spec.env_id == env_id:
            return spec
    raise ValueError(f"Unknown env id {env_id!r}. Registered: {', '.join(s.env_id for s in TASKS.values())}")


GYM_MAKE_KWARGS = ("max_episode_steps", "disable_env_checker")  # taken by gym.make itself, not by the env


def check_env_kwargs(spec: TaskSpec, kwargs: dict) -> None:
    """Refuse (ValueError) keyword arguments the task's env does not take, naming those it does."""
    import inspect

    from gymnasium.envs.registration import load_env_creator

    params = inspect.signature(load_env_creator(spec.entry_point)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    unknown = sorted(set(kwargs) - accepted - set(GYM_MAKE_KWARGS))
    if unknown:
        known = sorted(accepted - set(spec.kwargs))
        raise ValueError(f"Unknown env keyword argument(s) {', '.join(unknown)} for task {spec.name!r} "
                         f"(--env-kwargs); it accepts: {', '.join(known)}.")


def make_env(task: str, obs_type: str = "state", num_envs: int | None = None, **kwargs):
    """Make one env, or a synchronous VectorEnv of ``num_envs`` copies, for a task name."""
    spec = get_task(task)
    check_env_kwargs(spec, {"obs_type": obs_type, **kwargs})
    kwargs.setdefault("render_mode", "rgb_array")
    if num_envs is None:
        return gym.make(spec.env_id, obs_type=obs_type, **kwargs)
    return gym.make_vec(
        spec.env_id, num_envs=num_envs, vectorization_mode="sync", obs_type=obs_type, **kwargs
    )
