"""``cdal-fast segment --ray``: the driver plans, a pool of Ray actors (one model each) samples.

Units of work:

* many inputs: one whole input per task (:meth:`SegmentWorker.run_input`, i.e. the batch runner's
  per-input path with its skip-if-done check and error handling);
* fewer pending slides than actors (one huge slide): the driver plans the slide and stitches and
  writes it (the same :func:`segment_slide` through :func:`run_input`), while the tiles are sampled
  by the actors in units of whole sampler batches of about ``band_rows`` tile rows. At most
  ``window`` units are in flight and results are stitched in tile order, so the driver holds
  ``window`` units of results plus the one-tile-row band, whatever the slide's size.

Batches are cut exactly as in a single-process run and noise is keyed by (seed, tile position), so
outputs are byte-identical for any number of actors, order of completion or retries.

Fault tolerance is the driver's: a unit whose actor died (``RayActorError``: killed, out of memory,
node lost) is resubmitted to a fresh actor up to ``max_retries`` times; then that input alone is
reported failed and its partial files are removed. Completion markers make a rerun do only what
is missing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import partial_path
from ..job import SegmentJob
from ..runtime.requires import BackendError
from ..wsi.batch import InputOutcome, RunReport, TaskRun, error_text, run_summary_name
from ..wsi.outputs import is_small_image, output_names, output_paths, slide_stem
from ..wsi.pipeline import SlidePlan, TileResult
from ..wsi.readers import SlideError
from .progress import POLL_SECONDS, ClusterProgress, TileCounter, unit_key
from .scheduler import WorkerLost, in_order, run_banded
from .units import WINDOW_PER_WORKER, pending_inputs, unit_slices
from .worker import SegmentWorker, UnitResult, light_plan

__all__ = ["RAY_HINT", "require_ray", "RayOptions", "run_on_ray", "unit_slices"]

RAY_HINT = "--ray needs Ray: pip install 'cdal-fast[ray]' (or pip install 'ray>=2.9')"
DEFAULT_MAX_RETRIES = 2  # resubmissions of one unit after its actor died
# Ray starts worker processes at nice 15 so that they yield to its own daemons. Our actors do the
# run's compute and the driver mostly waits on them: at nice 15 they lost up to a third of their
# speed to the driver, the raylet and anything else of the same session on a loaded node.
ACTOR_ENV = {"RAY_worker_niceness": "0"}
DRIVER_THREADS = 1  # torch threads of a driver stitching a banded slide (per-pixel work: same bytes at any count)
Event = Callable[[str, dict[str, Any]], None]


def require_ray():
    """Import Ray or fail at start with the install hint."""
    try:
        import ray
    except ImportError:
        raise BackendError(RAY_HINT) from None
    return ray


@dataclass
class RayOptions:
    address: str = "local"  # "local" (start one here), "auto" (the running cluster) or HOST:PORT / ray://...
    cpus_per_actor: int = 1  # CPU nodes: one actor per this many cores
    actors: int | None = None  # default: one per GPU (cuda) or cores // cpus_per_actor
    max_retries: int = DEFAULT_MAX_RETRIES
    unit: str = "auto"  # "input", "band" or "auto" (bands when fewer slides than actors)
    band_rows: int = 1  # tile rows per band unit (rounded to whole sampler batches)
    events: Event | None = field(default=None, repr=False)  # hook: ("actors", ...), ("unit", ...) (tests)


def connect(ray, address: str) -> None:
    """Join ``address`` unless Ray is already initialised (a test or a notebook did it).

    The job's environment carries :data:`ACTOR_ENV`, so every worker process of the job, pre-started
    ones included, runs at nice 0 and an actor can take a pre-started process.
    """
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(ACTOR_ENV)}
    if address == "local":
        ray.init(include_dashboard=False, runtime_env=runtime_env)
    else:
        ray.init(address=address, runtime_env=runtime_env)


def actor_runtime_env(ray) -> dict[str, Any]:
    """Actor options that add :data:`ACTOR_ENV` when the job lacks it (Ray initialised by the caller);
    an actor-level environment costs a fresh worker process per actor, so it is added only then."""
    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    if all(job_env.get(k) == v for k, v in ACTOR_ENV.items()):
        return {}
    return {"runtime_env": {"env_vars": dict(ACTOR_ENV)}}


@dataclass
class _Stats:
    units: int = 0
    tiles: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0


class ActorPool:
    """Live actors, replaced when one dies; per-actor timings for the run summary."""

    def __init__(self, ray, job: SegmentJob, opts: RayOptions) -> None:
        self.ray, self.job, self.opts = ray, job, opts
        device = job.sampler.device
        gpu = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        resources = ray.cluster_resources()
        if opts.actors:
            n = opts.actors
        elif gpu:
            n = int(resources.get("GPU", 0))
        else:
            n = int(resources.get("CPU", 1)) // max(opts.cpus_per_actor, 1)
        if n < 1:
            raise BackendError(f"the Ray cluster has no room for an actor ({resources.get('CPU', 0):g} CPUs, "
                               f"{resources.get('GPU', 0):g} GPUs; --ray-cpus-per-actor {opts.cpus_per_actor})")
        env = actor_runtime_env(ray)
        self.cls = ray.remote(SegmentWorker).options(
            num_cpus=0 if gpu else opts.cpus_per_actor, num_gpus=1 if gpu else 0, max_restarts=0, **env)
        if not gpu:  # torch uses exactly the cores Ray reserved for the actor
            self.job = job.on_device(device, opts.cpus_per_actor)
        # Work is submitted at once and queues on each actor while it starts and loads its model: the
        # driver does not wait for the pool as a whole.
        self.actors = [self._start() for _ in range(n)]
        self.counter = ray.remote(TileCounter).options(num_cpus=0, **env).remote()
        self.snapshot = None  # the counter's answer in flight (the driver never blocks on it)
        self.stats: dict[str, _Stats] = {}
        self.deaths = 0
        if opts.events is not None:  # tests: who the actors are (their pids), once they are up
            self._emit("actors", {"identities": ray.get([a.identity.remote() for a in self.actors])})

    def _start(self):
        return self.cls.remote(self.job)

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.opts.events is not None:
            self.opts.events(kind, data)

    def replace_dead(self, actor) -> Any:
        """Swap a dead actor for a fresh one (same resources) and return the new one."""
        self.deaths += 1
        new = self._start()
        self.actors[self.actors.index(actor)] = new
        return new

    def poll(self, progress: ClusterProgress) -> None:
        """Draw what the actors reported, as of the last answer of the counter; ask it again."""
        if self.snapshot is not None:
            ready, _ = self.ray.wait([self.snapshot], timeout=0)
            if not ready:
                return
            progress.observe(self.ray.get(ready[0]))
        self.snapshot = self.counter.snapshot.remote()

    def record(self, worker: str, tiles: int, seconds: float, cpu_seconds: float) -> None:
        s = self.stats.setdefault(worker, _Stats())
        s.units, s.tiles, s.seconds = s.units + 1, s.tiles + tiles, s.seconds + seconds
        s.cpu_seconds += cpu_seconds
        self._emit("unit", {"worker": worker, "tiles": tiles})

    def shutdown(self) -> None:
        """Free the actors' resources now (a following run on the same cluster needs them)."""
        for a in [*self.actors, self.counter]:
            self.ray.kill(a)

    def summary(self) -> list[dict[str, Any]]:
        return [{"worker": w, "units": s.units, "tiles": s.tiles, "busy_seconds": s.seconds,
                 "cpu_seconds": s.cpu_seconds,
                 "tiles_per_second": s.tiles / s.seconds if s.seconds else 0.0} for w, s in sorted(self.stats.items())]


def _discard_partials(out_dir: Path, path: Path, layout: str, name: str) -> None:
    """Nothing partial is left of an input that failed after an actor died while writing it."""
    import shutil

    stem, sub_out = slide_stem(path), out_dir / Path(name).parent
    for p in output_paths(sub_out, stem, is_small_image(path), layout).values():
        partial_path(p).unlink(missing_ok=True)
    shutil.rmtree(sub_out / f".{stem}.work", ignore_errors=True)


def _run_inputs(ray, pool: ActorPool, files: list[Path], out_dir: Path, report: RunReport,
                progress: ClusterProgress, echo: Callable[[str], None], names: dict[Path, str]) -> None:
    """Whole inputs, one task per idle actor; a unit lost with its actor goes to a fresh one."""
    pending = deque(files)
    attempts: dict[Path, int] = {}
    running: dict[Any, tuple[Path, Any]] = {}
    idle = list(pool.actors)
    while pending or running:
        while pending and idle:
            f, actor = pending.popleft(), idle.pop()
            running[actor.run_input.remote(str(f), str(out_dir), names[f], pool.counter)] = (f, actor)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
        if not ready:
            pool.poll(progress)
            continue
        f, actor = running.pop(ready[0])
        try:
            outcome, worker, seconds, cpu_seconds = ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            attempts[f] = attempts.get(f, 0) + 1
            idle.append(pool.replace_dead(actor))
            if attempts[f] <= pool.opts.max_retries:
                echo(f"retry {f}: its worker died ({type(exc).__name__}); attempt {attempts[f] + 1}")
                pending.appendleft(f)
                continue
            _discard_partials(out_dir, f, pool.job.opts.pyramid_layout, names[f])
            outcome = InputOutcome(str(f), "failed", error=f"its worker died {attempts[f]} times (limit "
                                   f"--ray-max-retries {pool.opts.max_retries}); last: {exc}")
        except ray.exceptions.RayTaskError as exc:
            idle.append(actor)
            outcome = InputOutcome(str(f), "failed", error=error_text(exc.cause if exc.cause else exc))
        else:
            idle.append(actor)
            tiles = (outcome.summary or {}).get("tiles_sampled", 0)
            pool.record(worker, tiles, seconds, cpu_seconds)
            if outcome.status == "done":
                progress.settle(str(f), tiles, tiles)
        progress.finished(outcome.status)
        report.add(outcome, echo)


class _ActorUnits:
    """The scheduler's view of the actor pool: units to the least loaded actor, a dead actor replaced."""

    def __init__(self, ray, pool: ActorPool, progress: ClusterProgress, plan_ref, units: list[range],
                 key: str) -> None:
        self.ray, self.pool, self.progress = ray, pool, progress
        self.plan_ref, self.units, self.key = plan_ref, units, key
        self.actor_of: dict[Any, Any] = {}  # running ref -> its actor
        self.load = {id(a): 0 for a in pool.actors}

    def submit(self, unit: int) -> Any:
        actor = min(self.pool.actors, key=lambda a: self.load.get(id(a), 0))
        self.load[id(actor)] = self.load.get(id(actor), 0) + 1
        ref = actor.sample_unit.remote(self.plan_ref, list(self.units[unit]), self.pool.counter,
                                       unit_key(self.key, unit))
        self.actor_of[ref] = actor
        return ref

    def wait(self, handles: list[Any]) -> list[Any]:
        ready, _ = self.ray.wait(handles, num_returns=1, timeout=POLL_SECONDS)
        if not ready:
            self.pool.poll(self.progress)
        return ready

    def result(self, handle: Any, unit: int) -> UnitResult:
        actor = self.actor_of.pop(handle)
        self.load[id(actor)] -= 1
        try:
            result: UnitResult = self.ray.get(handle)
        except self.ray.exceptions.RayActorError as exc:
            self.load.pop(id(actor), None)
            self.load[id(self.pool.replace_dead(actor))] = 0
            lost = [ref for ref, a in self.actor_of.items() if a is actor]  # its queued units die with it
            for ref in lost:
                self.actor_of.pop(ref)
            raise WorkerLost(exc, lost) from None
        except self.ray.exceptions.RayTaskError as exc:
            raise SlideError(str(exc.cause if exc.cause else exc)) from None
        self.pool.record(result.worker, len(self.units[unit]), result.seconds, result.cpu_seconds)
        self.progress.settle(unit_key(self.key, unit), 0, len(self.units[unit]))
        return result


class BandStream:
    """The slide's tiles sampled by the pool in units of whole batches, yielded in tile order."""

    def __init__(self, ray, pool: ActorPool, progress: ClusterProgress) -> None:
        self.ray, self.pool, self.progress = ray, pool, progress

    def __call__(self, slide: SlidePlan, steps: int, votes: int) -> Iterator[TileResult]:
        key = str(slide.path)
        self.progress.expect(key, len(slide.tiles))
        units = unit_slices(len(slide.tiles), slide.grid.cols, self.pool.job.opts.batch_size,
                            self.pool.opts.band_rows)
        actors = _ActorUnits(self.ray, self.pool, self.progress, self.ray.put(light_plan(slide)), units, key)
        for result in in_order(actors, units, WINDOW_PER_WORKER * len(self.pool.actors), self.pool.opts.max_retries,
                               describe=lambda r: f"{slide.path}: tiles {r.start}-{r.stop - 1}"):
            yield from result.results


def run_on_ray(files: list[Path], out_dir: Path, job: SegmentJob, ray_opts: RayOptions, echo=print,
               show_progress: bool = True, shard: tuple[int, int] = (0, 1),
               names: dict[Path, str] | None = None) -> tuple[RunReport, dict[str, Any]]:
    """Segment ``files`` on a Ray pool; returns the report and the run summary (also written to OUT).

    ``names``: the output names (``outputs.output_names``; default: computed here, collisions raise),
    handed to the actors with each input so they write where a single-process run would.
    """
    if names is None:
        names = output_names(files)
    ray = require_ray()
    connect(ray, ray_opts.address)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = RunReport.for_batch(out_dir, files, names, job.opts, run_summary_name(*shard))
    todo = pending_inputs(files, out_dir, job, names, report, echo)
    if not todo:  # a rerun after everything finished: no actors to start
        summary = report.finish(t0, out_dir / run_summary_name(*shard),
                                {"ray": {"unit": None, "actors": 0, "actor_deaths": 0, "per_actor": []}})
        return report, summary
    pool = ActorPool(ray, job, ray_opts)
    progress = ClusterProgress(len(files), show_progress)
    use_bands = False
    try:
        use_bands = job.tiled and (ray_opts.unit == "band"
                                   or (ray_opts.unit == "auto" and len(todo) < len(pool.actors)))
        if use_bands:
            _run_bands_on_ray(ray, pool, todo, out_dir, names, report, progress, echo)
        else:
            _run_inputs(ray, pool, todo, out_dir, report, progress, echo, names)
    except BaseException:
        report.interrupted = True
        raise
    finally:  # the run summary is written however the run ends (also on Ctrl-C, with "interrupted": true)
        progress.close()
        extra = {"ray": {"unit": "band" if use_bands else "input", "actors": len(pool.actors),
                         "actor_deaths": pool.deaths, "per_actor": pool.summary()}}
        pool.shutdown()
        summary = report.finish(t0, out_dir / run_summary_name(*shard), extra)
    return report, summary


def _run_bands_on_ray(ray, pool: ActorPool, todo: list[Path], out_dir: Path, names: dict[Path, str],
                      report: RunReport, progress: ClusterProgress, echo: Callable[[str], None]) -> None:
    """The driver plans, stitches and writes each slide; the actors sample its units."""
    import torch

    _shape, cfg = ray.get(pool.actors[0].shape.remote())
    cpu = torch.device("cpu")
    job = pool.job
    run = TaskRun(job, _shape, None, job.decoding_config(cfg), cpu, job.model_record(None),  # type: ignore[arg-type]
                  sample_stream=BandStream(ray, pool, progress))
    threads = torch.get_num_threads()
    torch.set_num_threads(DRIVER_THREADS)  # the cores are the actors': the driver only stitches and writes
    try:
        run_banded(todo, out_dir, run, names, report, progress, echo)
    finally:
        torch.set_num_threads(threads)
