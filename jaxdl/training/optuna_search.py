"""Optuna's samplers and pruners driving vmapped groups (ask-and-tell).

Each round asks M trials from the study (TPE, random or grid sampler), trains them as
vmapped groups (`jaxdl.training.sweep.run_group`), reports every evaluation to the trial
so the successive-halving pruner can stop it, and tells the study each outcome. With an
RDB storage (``--storage sqlite:///DIR/sweep.db``, PostgreSQL on a cluster) several
`jaxdl sweep` processes share one study: Optuna numbers trials in the storage, so no two
processes train the same trial, and each member's record is DIR/trials/<number>.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from jaxdl.errors import UserError
from jaxdl.training.spaces import Space
from jaxdl.training.trainer import minimized

STUDY_NAME = "jaxdl-sweep"


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(
            "--strategy tpe / --storage: expected the optional Optuna package, found it "
            'missing. Fix: pip install "jaxdl[optuna]", or use --strategy grid|random.'
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _categorical(value):
    """Optuna's categorical choices are None/bool/int/float/str: tuples travel as JSON."""
    return json.dumps(value) if isinstance(value, list | tuple) else value


def _distributions(optuna, spaces: Sequence[Space]) -> dict:
    dist = optuna.distributions
    out = {}
    for s in spaces:
        if s.discrete:
            out[s.key] = dist.CategoricalDistribution([_categorical(v) for v in s.values])
        elif s.kind == "int":
            out[s.key] = dist.IntDistribution(*s.values)
        else:
            out[s.key] = dist.FloatDistribution(*s.values, log=s.kind == "loguniform")
    return out


def _sampler(optuna, strategy: str, spaces: Sequence[Space], seed: int):
    if strategy == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {s.key: [_categorical(v) for v in s.values] for s in spaces}
    return optuna.samplers.GridSampler(grid, seed=seed)


def _decode(spaces: Sequence[Space], params: dict) -> dict:
    out = {}
    for s in spaces:
        value = params[s.key]
        if (
            s.discrete
            and isinstance(value, str)
            and any(isinstance(v, list | tuple) for v in s.values)
        ):
            value = next(v for v in s.values if _categorical(v) == value)
        out[s.key] = value
    return out


def _open_study(optuna, storage: str | None, **kwargs):
    """Create or join the study. Processes started together race to create the storage's
    tables (sqlite: a UNIQUE constraint fails in the loser); the loser retries and joins."""
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            return optuna.create_study(
                study_name=STUDY_NAME, storage=storage, load_if_exists=True, **kwargs
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


def run(
    cfg: ml_collections.ConfigDict,
    workdir: Path,
    spaces: Sequence[Space],
    *,
    strategy: str,
    storage: str | None,
    trials: int,
    parallel: int,
    metric: str,
    echo: Callable[[str], None],
) -> None:
    """Ask, train and tell until the study holds ``trials`` trials."""
    optuna = _import_optuna()
    from jaxdl.training.sweep import group_key, member_config, run_group

    if strategy == "grid":
        for s in spaces:
            if not s.discrete:
                raise UserError(
                    f"--strategy grid: expected lists or choice(...) only, found {s.key}={s.text}."
                    " Fix: give a list of values, or use --strategy tpe|random."
                )
    study = _open_study(
        optuna,
        storage,
        sampler=_sampler(optuna, strategy, spaces, cfg.seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(),
        direction="minimize" if minimized(metric) else "maximize",
    )
    distributions = _distributions(optuna, spaces)
    while True:
        left = trials - len(study.get_trials(deepcopy=False))
        if left <= 0:
            break
        asked = []
        for _ in range(min(parallel, left)):
            trial = study.ask(distributions)
            if trial.number >= trials:  # another process took the last ones meanwhile
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            asked.append((trial, _decode(spaces, trial.params)))
        if not asked:
            break
        groups: dict[str, list] = {}
        for item in asked:
            groups.setdefault(group_key(item[1]), []).append(item)
        for members in groups.values():
            echo(f"sweep: training trials {[t.number for t, _ in members]} together")

            def should_prune(i: int, step: int, value: float, members=members) -> bool:
                trial = members[i][0]
                trial.report(value, step)
                return trial.should_prune()

            outcomes = run_group(
                [member_config(cfg, p) for _, p in members],
                [workdir / "trials" / f"{t.number:03d}" for t, _ in members],
                [p for _, p in members],
                metric=metric,
                should_prune=should_prune,
            )
            for (trial, _), outcome in zip(members, outcomes, strict=True):
                record = json.loads(
                    (workdir / "trials" / f"{trial.number:03d}" / "trial.json").read_text()
                )
                if outcome == "complete" and record["best"] is not None:
                    study.tell(trial, record["best"])
                elif outcome == "pruned":
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
