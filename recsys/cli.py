"""The ``recsys`` command line: ``train``, ``evaluate``, ``predict``, ``recommend``,
``datasets``.

Models are rating models (``mf``, ``rec``: trained by the `Trainer` with the training flags)
or ranking models (``task == "ranking"``, e.g. ``ease``: they fit themselves from their
config; flags named like their config fields set them, ``--param KEY=VALUE`` any field).
``recsys train`` of a rating model also fits the default ranker (`DEFAULT_RANKER`) on the same
training rows and saves it beside it, so that served recommendations come from a ranker;
``recsys evaluate --ranking`` with no ``--model`` evaluates the default ranker.

Every stage is the library called from argparse; user mistakes (a bad file, an unknown id,
a corrupt model directory) print one ``recsys: error: ...`` line and exit with status 2,
never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from recsys.artefact import save_artefact
from recsys.errors import RecsysError
from recsys.models import DEFAULT_RANKER, MODELS, Model, build_model, model_task
from recsys.ratings import Ratings
from recsys.train import OPTION_GROUPS, TrainConfig, Trainer

_CANONICAL = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")


# --------------------------------------------------------------------------- data
def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="builtin dataset name (see `recsys datasets`)")
    src.add_argument("--ratings", type=Path, help="a ratings file: CSV/TSV/any separator, or Parquet")
    g.add_argument("--sep", help="field separator of --ratings (default: sniffed)")
    g.add_argument("--columns", default="user,item,rating",
                   help="roles of the file's columns in order, e.g. user,item,rating,timestamp "
                        "(use _ for a column to skip); with a header, role=name pairs. Implicit "
                        "feedback (clicks, plays): no rating column, e.g. user,item[,timestamp] "
                        "(every interaction 1.0) or user,item,weight[,timestamp] (weighted)")
    header = g.add_mutually_exclusive_group()
    header.add_argument("--header", dest="header", action="store_true", default=None,
                        help="the file has a header line (default: detected)")
    header.add_argument("--no-header", dest="header", action="store_false")
    g.add_argument("--rating-scale", help="LOW,HIGH (default: the observed range)")
    g.add_argument("--split", default=None,
                   help="canonical fold(s) of the dataset (u1 or u1,u2,u3,u4,u5), or "
                        "random:FRACTION[:SEED], temporal:FRACTION, cold-users:FRACTION:K[:SEED], "
                        "or the ranking splits temporal-leave:K (each user's last K interactions) "
                        "and random-leave:K[:SEED]")
    g.add_argument("--test", type=Path, help="a second ratings file (same columns) as the test set")
    g.add_argument("--relevance", type=_relevance_arg, default=None,
                   help="ranking metrics: a test item is relevant when its rating is at least this "
                        "(default 4.0 for explicit ratings; 'all': every test interaction, the "
                        "default for implicit feedback)")


def _relevance_arg(text: str) -> float | str:
    if text.strip().lower() in ("all", "any", "every"):
        return "all"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def _implicit(args: argparse.Namespace) -> bool:
    """Whether the data is implicit feedback: a --ratings file with no rating column."""
    from recsys.datasets import ColumnSpec

    if getattr(args, "ratings", None) is None:
        return False
    columns = args.columns if "=" in args.columns else args.columns.split(",")
    return ColumnSpec.parse(columns).implicit


def relevance_threshold(args: argparse.Namespace) -> float | None:
    """The ranking metrics' relevance rule: ``--relevance``, else None (every test
    interaction) for implicit feedback and 4.0 for explicit ratings."""
    value = getattr(args, "relevance", None)
    if value == "all":
        return None
    if value is not None:
        return float(value)
    return None if _implicit(args) else 4.0


def _rating_scale(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise RecsysError(f"--rating-scale must be LOW,HIGH, got {text!r}") from None
    return lo, hi


def _read_file(args: argparse.Namespace, path: Path, **maps) -> Ratings:
    from recsys.datasets import read_ratings

    columns = args.columns if "=" in args.columns else args.columns.split(",")
    return read_ratings(path, sep=args.sep, columns=columns, header=args.header,
                        rating_scale=_rating_scale(args.rating_scale), **maps)


def load_folds(args: argparse.Namespace) -> list[tuple[str, Ratings, Ratings | None]]:
    """(name, train, test) for every requested split; test is None when there is no split."""
    from recsys.datasets import dataset_splits, load_dataset, load_split
    from recsys.splits import parse_split

    if args.test is not None:
        if args.ratings is None:
            raise RecsysError("--test needs --ratings (the training file)")
        if args.split:
            raise RecsysError("give either --split or --test, not both")
        train = _read_file(args, args.ratings)
        # Index the test file into maps that also hold its unseen ids (they get the fallback).
        test_raw = _read_file(args, args.test)
        user_ids = train.user_ids.extend(test_raw.user_ids.raw_ids)
        item_ids = train.item_ids.extend(test_raw.item_ids.raw_ids)
        return [("test", train.with_id_maps(user_ids, item_ids), test_raw.with_id_maps(user_ids, item_ids))]
    specs = [s.strip() for s in args.split.split(",")] if args.split else []
    if args.dataset and specs and all(s in _CANONICAL for s in specs):
        valid = dataset_splits(args.dataset)
        bad = [s for s in specs if s not in valid]
        if bad:
            raise RecsysError(f"dataset {args.dataset!r} has no split {bad[0]!r}; it has {', '.join(valid)}")
        return [(s, *load_split(args.dataset, s)) for s in specs]
    ratings = load_dataset(args.dataset) if args.dataset else _read_file(args, args.ratings)
    if not specs:
        return [("all", ratings, None)]
    if len(specs) != 1:
        raise RecsysError("several splits at once are only for canonical folds (u1,u2,...)")
    if specs[0] in _CANONICAL:
        raise RecsysError(f"split {specs[0]!r} is a canonical fold of a builtin dataset; use --dataset")
    split = parse_split(specs[0]).apply(ratings)
    return [(split.name, split.train, split.test)]


# --------------------------------------------------------------------------- model and training
def _add_model_args(p: argparse.ArgumentParser, default_model: str | None = "mf") -> None:
    g = p.add_argument_group("model and training (defaults tuned on MovieLens-100K validation slices)")
    default = "mf" if default_model else f"mf, or with --ranking the default ranker ({DEFAULT_RANKER})"
    g.add_argument("--model", default=default_model, choices=sorted(MODELS),
                   help=f"default: {default}; ranking models fit themselves (no training flags but those "
                        "named like their config fields)")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set any field of the model's config (VALUE read as JSON, else as text); repeatable")
    g.add_argument("--embedding-size", type=int)
    g.add_argument("--n-blocks", type=int, help="MF: independent factor blocks averaged (1 = classic MF)")
    g.add_argument("--reg", type=float, help="L2 weight on factors per visit")
    g.add_argument("--bias-reg", type=float)
    g.add_argument("--reg-exponent", type=float, help="frequency scaling of the regularisation")
    g.add_argument("--init-std", type=float)
    g.add_argument("--prototypes", type=int, help="REC: users and items with free vectors (the most rated)")
    g.add_argument("--fanouts", type=_int_list, help="REC: neighbours sampled per depth (default 32,8,4)")
    g.add_argument("--hidden-size", type=int, help="REC: width of the message networks")
    g.add_argument("--evidence-dropout", type=float, help="REC: training-time evidence truncation rate")
    g.add_argument("--eval-passes", type=int, help="REC: samplings averaged per prediction")
    g.add_argument("--cold-roots", type=float,
                   help="REC: training-time share of users/items treated as new (teaches cold start)")
    g.add_argument("--cold-shrink", type=float,
                   help="REC: prediction-time shrinkage of vectors built from few ratings (default 3; 0: off)")
    g.add_argument("--item-bias-reg", type=float, help="REC: ridge weight of the baseline item biases")
    g.add_argument("--mlp-reg", type=float, help="REC: L2 weight on the message networks' weights")
    g.add_argument("--message-dropout", dest="dropout", type=float,
                   help="REC: dropout on the message networks' hidden layer")
    g.add_argument("--target-free-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="REC: predict each training rating with baseline biases that leave it out")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float)
    g.add_argument("--lr-decay", type=float, help="learning-rate factor per epoch")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", choices=["sgd", "adam", "adagrad", "sparse-adam", "cov-noise",
                                           "kfac", "ekfac", "tkfac", "tekfac"])
    g.add_argument("--salr", action="store_true", default=None,
                   help="scale the learning rate by local sharpness / median sharpness (SALR)")
    g.add_argument("--lr-scaling", choices=["auto", "none", "linear", "sqrt"], default="auto",
                   help="scale the optimizer's reference schedule (its tuned batch size, learning rate, "
                        "epochs, K-FAC damping) to --batch-size: auto (default: the optimizer's own rule, "
                        "linear for SGD-like, sqrt for adaptive; off when --lr is given), linear or sqrt "
                        "(scale the given or reference rate by that rule), none (no scaling)")
    g.add_argument("--noise-batch", type=int, help="cov-noise: the small batch whose gradient noise is restored")
    g.add_argument("--noise-structure", choices=["diag", "full", "isotropic"], help="cov-noise: noise covariance")
    g.add_argument("--noise-scale", type=float, help="cov-noise: multiplier on the noise's standard deviation")
    g.add_argument("--noise-estimator", choices=["per-example", "sub-batch"],
                   help="cov-noise: covariance from per-example gradients (SGD; MF) or from sub-batch "
                        "gradients (any --noise-base; REC)")
    g.add_argument("--noise-base", choices=["sgd", "adam", "adagrad"],
                   help="cov-noise with --noise-estimator sub-batch: the optimizer that steps")
    g.add_argument("--damping", type=float, help="kfac/ekfac/tkfac/tekfac: relative damping (default: the model's for the optimizer; MF 0.01, REC 1.0)")
    g.add_argument("--stats-freq", type=int,
                   help="kfac/tkfac: update the curvature factors every N steps (default: the model's; MF 10, REC 1)")
    g.add_argument("--visit-gain", type=float,
                   help="kfac/ekfac/tkfac/tekfac: per-row step cap on embedding rows (default 0.1; 0: no cap)")
    g.add_argument("--sampler", choices=["reshuffle", "shuffle-once", "with-replacement", "fixed"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, help="CPU threads (default: all)")
    g.add_argument("--hogwild", action="store_true", default=None,
                   help="lock-free parallel SGD on the CPU: ~2x faster on 2 cores, not reproducible")
    g.add_argument("--validation", type=float, default=0.0,
                   help="fraction of the training ratings held out to validate every epoch and "
                        "stop early (default 0: train the tuned number of epochs on all of them)")
    g.add_argument("--patience", type=int, default=5)
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


#: the per-optimizer flags (their ``args`` names) and the `TrainConfig` option group and field
#: each sets (``--noise-batch`` -> ``TrainConfig.noise.batch``)
_OPTION_FLAGS: dict[str, tuple[str, str]] = {
    "noise_batch": ("noise", "batch"), "noise_structure": ("noise", "structure"),
    "noise_scale": ("noise", "scale"), "noise_estimator": ("noise", "estimator"), "noise_base": ("noise", "base"),
    "damping": ("kfac", "damping"), "stats_freq": ("kfac", "stats_freq"), "visit_gain": ("kfac", "visit_gain"),
}


#: flags every model takes (not training flags)
_GENERIC_FLAGS = frozenset({"seed", "device", "threads"})
#: flags that only the `Trainer` of a rating model reads: (dest, value meaning "not given")
_TRAINING_ONLY = (("validation", 0.0), ("lr_scaling", "auto"), ("rollback", False),
                  ("rollback_float16", False), ("rollback_exact", False), ("nproc", 1))


def _flag(name: str) -> str:
    return "--" + {"dropout": "message-dropout"}.get(name, name.replace("_", "-"))


def _check_model_flags(args: argparse.Namespace) -> None:
    """A flag of another model's config (``--cold-roots`` with MF) is an error, not ignored;
    so is a training flag given to a ranking model that has no such config field."""
    model_cls, config_cls = MODELS[args.model]
    names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(_params(args)) - names)
    if unknown:
        raise RecsysError(f"unknown {args.model} config keys {unknown} (--param); valid: {sorted(names)}")
    if model_cls.task == "ranking":
        own = {f.name for f in fields(config_cls)} | _GENERIC_FLAGS
        flags = ({f.name for _, cls in MODELS.values() for f in fields(cls)} | {f.name for f in fields(TrainConfig)}
                 | set(_OPTION_FLAGS) | {"salr"}) - {"progress", "patience", "chunk_size", *OPTION_GROUPS}
        given = [name for name in sorted(flags - own) if getattr(args, name, None) is not None]
        given += [name for name, unset in _TRAINING_ONLY if getattr(args, name, unset) != unset]
        if given:
            raise RecsysError(
                f"{_flag(given[0])} does not apply to --model {args.model}: a ranking model fits itself "
                f"from its config (fields: {', '.join(sorted(f.name for f in fields(config_cls)))}; "
                "set them with the flag of that name or --param KEY=VALUE)")
        return
    config_cls = MODELS[args.model][1]
    own = {f.name for f in fields(config_cls)} | {f.name for f in fields(TrainConfig)} | set(_OPTION_FLAGS)
    foreign = sorted({f.name for _, cls in MODELS.values() for f in fields(cls)} - own)
    given = [name for name in foreign if getattr(args, name, None) is not None]
    if given:
        raise RecsysError(f"{_flag(given[0])} does not apply to --model {args.model}")


def _params(args: argparse.Namespace) -> dict:
    """``--param KEY=VALUE`` pairs (VALUE as JSON when it parses, else the text)."""
    out: dict = {}
    for item in getattr(args, "param", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecsysError(f"--param takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def model_config(args: argparse.Namespace, name: str | None = None) -> dict:
    """The config of model ``name`` (default ``--model``) from the flags named like its
    fields, ``--seed`` and ``--param``; for another model (the ranker fitted beside a rating
    model) only ``--seed``."""
    name = name or args.model
    names = {f.name for f in fields(MODELS[name][1])}
    if name != args.model:  # a ranker beside the rating model: its defaults and the seed
        return {"seed": args.seed} if "seed" in names else {}
    cfg = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if "seed" in names or model_task(name) == "rating":
        cfg["seed"] = args.seed
    return cfg | _params(args)


def _configs(args: argparse.Namespace, examples: int | None = None) -> tuple[dict, TrainConfig]:
    """The model's config and the `TrainConfig` from the flags; ``examples``: training ratings
    per epoch (the batch-size scaling's step floor, `recsys.optim.scaling.MIN_STEPS`)."""
    model_cls, config_cls = MODELS[args.model]
    model_cfg = model_config(args)
    train_over: dict[str, object] = {
        f.name: getattr(args, f.name) for f in fields(TrainConfig)
        if f.name not in ("progress", "patience", *OPTION_GROUPS) and getattr(args, f.name, None) is not None}
    for flag, (group, name) in _OPTION_FLAGS.items():  # into the optimizers' own configs
        value = getattr(args, flag, None)
        if value is not None:
            train_over.setdefault(group, {})[name] = None if flag == "visit_gain" and value == 0 else value
    if getattr(args, "salr", None):
        train_over["salr"] = {}  # SALR with its defaults
    # the model's own training defaults (e.g. REC: Adam, batches), those of the optimizer
    # chosen instead of the model's own, then explicit flags
    # (and the optimizer's reference schedule scaled to --batch-size, `recsys.optim.scaling`)
    train_cfg = replace(TrainConfig.for_model(model_cls, lr_scaling=getattr(args, "lr_scaling", "auto"),
                                              examples=examples, **train_over),
                        patience=args.patience if args.validation else None,
                        progress=False if args.quiet else None)
    return model_cfg, train_cfg


def fit_ranker(name: str, train: Ratings, config: dict | None = None, *, device: str = "cpu",
               threads: int | None = None, quiet: bool = True) -> tuple[Model, dict]:
    """Build the ranking model ``name`` with ``config`` and fit it on ``train`` (it fits
    itself: no `Trainer` flags); returns it and a summary (``fit_seconds``, its config)."""
    if threads is not None:
        torch.set_num_threads(threads)
    model = build_model(name, train.n_users, train.n_items, train.rating_scale, config)
    model.to(device)
    summary = dict(model.fit(train, progress=False if quiet else None))
    model.eval()
    return model, {"model": name, **summary, "model_config": model.config_dict()}


def fit_model(args: argparse.Namespace, train: Ratings, callbacks: Sequence = (),
              parallel=None) -> tuple[Model, Ratings, dict]:
    """Build and train (a rating model) or fit (a ranking model) the requested model; returns
    it, the ratings it was fitted on and a summary of the run. ``parallel``: this rank's
    `recsys.distributed.DataParallel` when training data-parallel."""
    from recsys.splits import validation_slice

    if model_task(args.model) == "ranking":
        if parallel is not None:
            raise RecsysError(f"--model {args.model} is a ranking model: data-parallel training is for rating models")
        model, summary = fit_ranker(args.model, train, model_config(args), device=args.device,
                                    threads=args.threads, quiet=args.quiet)
        return model, train, summary
    fit_part, validation = train, None
    if args.validation:
        fit_part, validation = validation_slice(train, args.validation, seed=args.seed)
    model_cfg, train_cfg = _configs(args, examples=len(fit_part))
    if train_cfg.scaling is not None and train_cfg.scaling.warning and (parallel is None or parallel.is_main):
        print(f"recsys: warning: {train_cfg.scaling.warning}", file=sys.stderr)
    model = build_model(args.model, train.n_users, train.n_items, train.rating_scale, model_cfg)
    result = Trainer(train_cfg, callbacks=callbacks, parallel=parallel).fit(model, fit_part, validation)
    summary = {
        "fit_seconds": result.fit_seconds,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "best_validation_rmse": result.best_validation_rmse,
        "step_kind": result.step_kind,
        "model_config": model.config_dict(),
        "train_config": asdict(train_cfg),
    }
    if parallel is not None:
        summary["world_size"] = parallel.world_size
        summary["backend"] = parallel.backend
    return model, fit_part, summary


# --------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    """``recsys train``: one process, or data-parallel over ``--nproc`` processes spawned here,
    or over the processes of a ``torchrun`` launch (see `recsys.distributed`)."""
    from recsys.distributed import env_world_size, init_from_env

    nproc, world = getattr(args, "nproc", 1), env_world_size()
    if nproc < 1:
        raise RecsysError(f"--nproc must be >= 1, got {nproc}")
    if world > 1 and nproc not in (1, world):
        raise RecsysError(f"--nproc {nproc} under a launcher with WORLD_SIZE={world}: give one or the other")
    if nproc > 1 and world <= 1:
        return _spawn_train(args, nproc)
    parallel = init_from_env(args.device) if world > 1 else None
    try:
        return _train(args, parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _spawn_train(args: argparse.Namespace, nproc: int) -> int:
    """Run `_train` data-parallel in ``nproc`` local processes (gloo on the CPU, NCCL on CUDA);
    returns rank 0's exit status."""
    import os

    import torch.multiprocessing as mp

    from recsys.distributed import spawn

    _, train_cfg = _configs(args)
    if train_cfg.batch_size == 1:
        raise RecsysError(f"--nproc {nproc} needs minibatches (each process takes a slice of every batch); "
                          "give --batch-size, e.g. --batch-size 1024 --lr-scaling linear (the compiled "
                          "batch-1 SGD kernel is single-process)")
    if args.threads is None:  # share the cores between the processes
        args.threads = max(1, (os.cpu_count() or 1) // nproc)
    try:
        spawn(_train_worker, nproc, args, threads=args.threads)
    except mp.ProcessExitedException as exc:
        return int(exc.exit_code) if exc.exit_code and exc.exit_code > 0 else 1
    except mp.ProcessRaisedException as exc:
        raise RecsysError(f"a training process failed:\n{exc}") from None
    return 0


def _train_worker(args: argparse.Namespace) -> None:
    """One spawned rank of `_spawn_train`: a user error is one ``recsys: error:`` line (from
    rank 0) and exit status 2, as in one process."""
    from recsys.distributed import init_from_env

    parallel = init_from_env(args.device)
    try:
        code = _train(args, parallel)
    except (RecsysError, ValueError, FileNotFoundError) as exc:
        if parallel is None or parallel.is_main:
            print(f"recsys: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if code:
        raise SystemExit(code)


def _train(args: argparse.Namespace, parallel=None) -> int:
    from recsys.evaluate import evaluate_ranking, evaluate_ratings

    main = parallel is None or parallel.is_main
    folds = load_folds(args)
    if len(folds) != 1:
        raise RecsysError("train takes one split; use `recsys evaluate` for several folds")
    name, train, test = folds[0]
    if model_task(args.model) == "ranking":
        return _train_ranker(args, name, train, test)
    ranker_name = _beside_ranker(args)
    if main:
        _print(args, f"training {args.model} on {train.describe()}"
                     + (f" with {parallel.world_size} {parallel.backend} processes" if parallel else ""))
    rollback = _rollback_callback(args)
    model, fit_part, summary = fit_model(args, train, [rollback] if rollback else [], parallel)
    if parallel is not None and rollback is not None and rollback.log is not None:
        parallel.merge_rollback_log(rollback.log)  # each rank logged its own examples
    if not main:
        return 0
    metrics = evaluate_ratings(model, test) if test is not None else {}
    ranker, ranker_summary = None, None
    if ranker_name is not None:
        _print(args, f"fitting the ranker {ranker_name} on the same training rows")
        ranker, ranker_summary = _fit_beside(args, ranker_name, fit_part)
        if ranker is not None and test is not None:
            ranker_summary["test_metrics"] = evaluate_ranking(ranker, fit_part, test, k=args.k,
                                                              relevance_threshold=relevance_threshold(args))
    if args.out:
        save_artefact(args.out, model, fit_part, {"split": name, "training": summary, "test_metrics": metrics},
                      rollback=rollback.log if rollback else None, ranker=ranker,
                      ranker_metadata={"split": name, "training": ranker_summary} if ranker is not None else None)
    if args.json:
        print(json.dumps({"split": name, **summary, **metrics, "ranker": ranker_summary}))
        return 0
    print(f"fitted in {summary['fit_seconds']:.2f} s ({summary['epochs_run']} epochs, {summary['step_kind']} steps)")
    if metrics:
        print(f"held-out {name}: RMSE {metrics['rmse']:.4f}  MAE {metrics['mae']:.4f}  "
              f"on {metrics['n_test']:,} ratings ({metrics['n_fallback']} by fallback)")
        _show_examples(model, test)
    if ranker_summary is not None:
        if "error" in ranker_summary:
            print(f"ranker {ranker_name} not saved: {ranker_summary['error']}")
        else:
            print(f"ranker {ranker_name} fitted in {ranker_summary['fit_seconds']:.2f} s"
                  + (f"; {_ranking_line(ranker_summary['test_metrics'])}" if "test_metrics" in ranker_summary else ""))
    if args.out:
        print(f"saved to {args.out}" + (f" (recommendations by {ranker_name}, in {args.out}/ranker)" if ranker else ""))
    return 0


def _beside_ranker(args: argparse.Namespace) -> str | None:
    """The ranker to fit beside a rating model: ``--ranker`` (``none``: no ranker), else
    `DEFAULT_RANKER` when it is registered."""
    name = getattr(args, "ranker", None)
    if name is None:
        return DEFAULT_RANKER if DEFAULT_RANKER in MODELS else None
    if name.lower() == "none":
        return None
    if name not in MODELS or model_task(name) != "ranking":
        rankers = sorted(n for n in MODELS if model_task(n) == "ranking")
        raise RecsysError(f"--ranker {name!r} is not a ranking model; choose one of {', '.join(rankers)} or none")
    return name


def _fit_beside(args: argparse.Namespace, name: str, train: Ratings) -> tuple[Model | None, dict]:
    """Fit ranker ``name`` (its defaults, ``--seed``) beside the rating model. When the
    default ranker cannot be fitted (e.g. a catalogue past its memory guard), the rating model
    is saved alone and the summary says why; a ``--ranker`` named explicitly fails loudly."""
    try:
        return fit_ranker(name, train, model_config(args, name), device=args.device, threads=args.threads)
    except (RecsysError, ValueError, MemoryError) as exc:
        if getattr(args, "ranker", None) is not None:
            raise
        print(f"recsys: warning: the default ranker {name} was not fitted ({exc}); recommendations "
              "will rank by predicted rating", file=sys.stderr)
        return None, {"model": name, "error": str(exc)}


def _ranking_line(m: dict) -> str:
    if m.get("n_users") in (None, 0):
        return "no test user with a relevant item"
    return (f"P@{m['k']} {m['precision']:.4f}  R@{m['k']} {m['recall']:.4f}  NDCG@{m['k']} {m['ndcg']:.4f}  "
            f"MAP@{m['k']} {m['map']:.4f}  coverage {m['coverage']:.3f}  ({m['n_users']:,} users)")


def _train_ranker(args: argparse.Namespace, name: str, train: Ratings, test: Ratings | None) -> int:
    """``recsys train --model <ranker>``: fit, evaluate on the test part (ranking metrics),
    save the ranker alone (served as is)."""
    from recsys.evaluate import evaluate_ranking

    if getattr(args, "ranker", None) is not None:
        raise RecsysError(f"--ranker goes with a rating model; --model {args.model} ranks itself")
    _print(args, f"fitting {args.model} on {train.describe()}")
    model, _, summary = fit_model(args, train)
    metrics = (evaluate_ranking(model, train, test, k=args.k, relevance_threshold=relevance_threshold(args))
               if test is not None else {})
    if args.out:
        save_artefact(args.out, model, train, {"split": name, "training": summary, "test_metrics": metrics})
    if args.json:
        print(json.dumps({"split": name, **summary, **metrics}))
        return 0
    print(f"fitted {args.model} in {summary['fit_seconds']:.2f} s")
    if metrics:
        print(f"held-out {name}: {_ranking_line(metrics)}")
    if args.out:
        print(f"saved to {args.out}")
    return 0


def _show_examples(model: Model, test: Ratings, n: int = 5) -> None:
    rows = np.random.default_rng(0).choice(len(test), size=min(n, len(test)), replace=False)
    u = torch.from_numpy(test.users[rows])
    i = torch.from_numpy(test.items[rows])
    pred = model.predict(u, i).cpu().numpy()
    print("examples (user, item, true rating, predicted):")
    for k, row in enumerate(rows):
        raw_item = test.item_ids.raw(int(test.items[row]))
        title = test.title(raw_item) or f"item {raw_item}"
        print(f"  user {test.user_ids.raw(int(test.users[row])):>6}  {title[:48]:<48}  "
              f"{test.values[row]:4.1f}  {pred[k]:5.2f}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from recsys.evaluate import evaluate_ranking, evaluate_ratings

    folds = load_folds(args)
    ranker = model_task(args.model) == "ranking"
    ranking = args.ranking or ranker  # a ranking model is evaluated by its ranking
    relevance = relevance_threshold(args)
    results = []
    for name, train, test in folds:
        if test is None:
            raise RecsysError("evaluate needs a test set: give --split or --test")
        model, fit_part, summary = fit_model(args, train)
        res: dict = {"split": name, "n_train": len(fit_part), "n_test": len(test)}
        if not ranker:
            res.update(evaluate_ratings(model, test))
        res["fit_seconds"] = summary["fit_seconds"]
        if "epochs_run" in summary:
            res["epochs_run"] = summary["epochs_run"]
        if ranking:
            res.update(evaluate_ranking(model, train, test, k=args.k, relevance_threshold=relevance))
        results.append(res)
        if not args.json:
            parts = [] if ranker else [f"RMSE {res['rmse']:.4f}  MAE {res['mae']:.4f}"]
            parts += [_ranking_line(res)] if ranking else []
            print(f"{name}: {'  '.join(parts)}  fit {res['fit_seconds']:.2f} s")
    out: dict = dict(results[0]) if len(results) == 1 else {"folds": results}
    if len(results) > 1:
        numeric = [k for k in results[0] if all(isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool)
                                                 for r in results)]
        out["mean"] = {k: float(np.mean([r[k] for r in results])) for k in numeric}
        out.update({k: out["mean"][k] for k in ("rmse", "mae", "fit_seconds", "precision", "recall", "ndcg",
                                                 "map", "coverage") if k in out["mean"]})
        if ranking:
            out["k"], out["relevance_threshold"] = args.k, relevance
        out["n_train"] = int(sum(r["n_train"] for r in results))
        out["n_test"] = int(sum(r["n_test"] for r in results))
    out["model"] = args.model
    if args.json:
        print(json.dumps(out))
    elif len(results) > 1:
        parts = [] if ranker else [f"RMSE {out['rmse']:.4f}  MAE {out['mae']:.4f}"]
        if ranking:
            parts.append("  ".join(f"{key} {out[key]:.4f}" for key in ("precision", "recall", "ndcg", "map", "coverage")
                                   if out.get(key) is not None))
        print(f"mean over {len(results)} folds: {'  '.join(parts)}  fit {out['fit_seconds']:.2f} s")
    return 0


def _recommender(args: argparse.Namespace):
    """The serving facade over the saved model (one path with the service), not warmed: a
    command answers one question."""
    from recsys.recommender import Recommender

    return Recommender.load(args.model, warm=False)


def cmd_predict(args: argparse.Namespace) -> int:
    p = _recommender(args).predict(args.user, args.item)
    if args.json:
        print(json.dumps({"user": p.user, "item": p.item, "title": p.title, "prediction": p.rating,
                          "path": p.path}))
    else:
        print(f"{p.rating:.3f}  (user {p.user}, item {p.item}{f' {p.title}' if p.title else ''}, {p.path})")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """Top-k by the artefact's ranker (its score), with the rating model's predicted rating
    beside each item where there is one (null otherwise)."""
    rec = _recommender(args).recommend(args.user, args.k)
    items = [{"item": p.item, "title": p.title, "score": p.score, "rating": p.rating} for p in rec.items]
    if args.json:
        print(json.dumps({"user": rec.user, "path": rec.path, "items": items}))
    else:
        print(f"user {rec.user} ({rec.path}): score, predicted rating, item")
        for rank, it in enumerate(items, 1):
            rating = "    -" if it["rating"] is None else f"{it['rating']:5.2f}"
            print(f"{rank:3d}. {it['score']:9.4f}  {rating}  {it['title'] or it['item']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve with ``--workers`` uvicorn processes (default: one per core). Every worker loads
    the model and follows the one rating store (api/service.py), so all answer alike."""
    import os

    import uvicorn
    from pydantic import ValidationError

    from api.app import Settings, create_app
    from api.supervision import SUPERVISOR_ENV
    from recsys.store import RatingStore

    overrides = {"model": args.model.resolve()}
    if args.db is not None:
        overrides["db"] = args.db.resolve()
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # one line per bad RECSYS_* setting
        raise RecsysError("; ".join(f"RECSYS_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']} (got {e['input']!r})"
                                    for e in exc.errors())) from None
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise RecsysError(f"--workers must be at least 1, got {workers}")
    from api.workers import PortInUseError, check_free, run_workers
    from recsys.artefact import load_artefact as _check  # fail fast, with a one-line error

    try:  # before the store records this server's model: a server already on the port keeps its own
        check_free(args.host, args.port)
    except PortInUseError as exc:
        raise RecsysError(str(exc)) from None
    try:
        _check(settings.model)
        with RatingStore(settings.db) as store:  # every worker (and process on the store) serves this model
            store.choose_model(str(settings.model))
    except RecsysError:
        raise
    except Exception as exc:  # a malformed artefact or an unusable store path: one line, no stack trace
        raise RecsysError(f"cannot serve {settings.model} with the store {settings.db}: "
                          f"{type(exc).__name__}: {exc}") from exc
    log_level = "warning" if args.quiet else "info"
    if workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, workers=1, log_level=log_level,
                    access_log=args.access_log)
        return 0
    # each worker process builds its app from RECSYS_* (create_app() reads Settings from them)
    os.environ["RECSYS_MODEL"], os.environ["RECSYS_DB"] = str(settings.model), str(settings.db)
    # workers stop by themselves if this process dies without stopping them (api/supervision.py)
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    # a spawned worker re-imports this module (torch) before it can answer the supervisor's
    # health check: on a busy machine that takes longer than uvicorn's default 5 s
    config = uvicorn.Config("api.app:create_app", factory=True, host=args.host, port=args.port, workers=workers,
                            log_level=log_level, access_log=args.access_log, timeout_worker_healthcheck=60)
    try:
        run_workers(config)  # a listening socket per worker: the kernel spreads the connections (api/workers.py)
    except PortInUseError as exc:
        raise RecsysError(str(exc)) from None
    return 0


# --------------------------------------------------------------------------- explanations
def _rollback_callback(args: argparse.Namespace):
    if not getattr(args, "rollback", False):
        return None
    from recsys.explain.rollback import RollbackCallback

    return RollbackCallback(torch.float16 if args.rollback_float16 else torch.float32,
                            mode="exact" if getattr(args, "rollback_exact", False) else "compact")


def cmd_explain(args: argparse.Namespace) -> int:
    rec = _recommender(args)
    if args.method == "rollback" and rec.artefact.rollback is None:
        raise RecsysError(f"{args.model} has no rollback log; train it with `recsys train --rollback`")
    exp = rec.explain(args.user, args.item, args.k, args.method)
    if args.json:
        print(json.dumps(exp.to_dict()))
        return 0
    what = "predicted" if "rating" in exp.units else "score"
    print(f"user {exp.user}, item {exp.item}{f' {exp.title}' if exp.title else ''}: {what} "
          f"{exp.prediction:.3f}; {len(exp.contributions)} of {exp.n_candidates} ratings "
          f"by effect ({exp.method}, {exp.units})")
    for c in exp.contributions:
        what = c.title or f"item {c.item}"
        print(f"  {c.effect:+.4f}  user {c.user:>6} rated {what[:44]:<44} {c.rating:3.1f}  (shares {c.shares})")
    return 0


def cmd_explain_eval(args: argparse.Namespace) -> int:
    """Faithfulness of the served explanations of the model ``recsys train`` would fit with
    the same flags (its defaults by default) against exact leave-one-out retraining."""
    from recsys.experiments.faithfulness import Setup, served_run

    folds = load_folds(args)
    if len(folds) != 1 or folds[0][2] is None:
        raise RecsysError("explain-eval needs one split with a test set, e.g. --dataset ml-100k --split u1")
    if args.model not in ("mf", "rec"):
        raise RecsysError(f"explain-eval measures mf and rec explanations; got --model {args.model}")
    if args.model == "rec" and args.method is not None:
        raise RecsysError("--method is for mf; rec is scored with its served explainer")
    for name in ("pairs", "candidates", "removal_pairs"):
        if getattr(args, name) < 1:
            raise RecsysError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers < 1:
        raise RecsysError(f"--workers must be at least 1, got {args.workers}")
    if args.fold_in_users < 0:
        raise RecsysError(f"--fold-in-users must be >= 0, got {args.fold_in_users}")
    _check_model_flags(args)
    model_cfg, train_cfg = _configs(args)
    _, train, test = folds[0]
    if args.model == "rec":  # REC's served explainer against retraining (recsys.experiments.rec_faithfulness)
        from recsys.experiments.rec_faithfulness import retrained_run
        from recsys.experiments.rec_faithfulness import served_run as rec_served_run

        if args.retrain_removals < 3:
            raise RecsysError(f"--retrain-removals must be at least 3, got {args.retrain_removals}")
        model, out = retrained_run(train, test, model_cfg, replace(train_cfg, progress=False),
                                   n_removals=args.retrain_removals, replica_removals=args.retrain_removals,
                                   noise_removals=0 if args.no_noise_floor else max(3, args.retrain_removals // 2),
                                   workers=args.workers, seed=args.seed, work_dir=args.work_dir)
        out.pop("points")
        # what removing a rating does to the served model without retraining (REC's cold start and
        # online path: new users and ratings are never trained on), and users folded in from 5 ratings
        no_retrain = rec_served_run(model, test, n_pairs=args.pairs, n_candidates=args.candidates,
                                    n_removal_pairs=args.removal_pairs, n_fold_in_users=args.fold_in_users,
                                    noise_floor=not args.no_noise_floor, seed=args.seed)
        out["fold_in"] = no_retrain.pop("fold_in")
        out["no_retrain"] = no_retrain
    else:
        setup = Setup(MODELS["mf"][1](**model_cfg), replace(train_cfg, progress=False))
        out = served_run(train, test, setup=setup, method=args.method, n_predictions=args.pairs,
                         n_candidates=args.candidates, n_removal_pairs=args.removal_pairs,
                         fold_in_users=args.fold_in_users, noise_floor=not args.no_noise_floor, seed=args.seed,
                     workers=args.workers)
        out.pop("points")
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0


def _add_explain_parsers(sub) -> None:
    from recsys.explain.influence import METHODS

    p = sub.add_parser("explain", help="the training ratings behind one prediction of a saved model")
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("--user", required=True)
    p.add_argument("--item", required=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--method", choices=METHODS, default=None,
                   help="MF: newton (default: most faithful in explain-eval; cached per row), rollback "
                        "(needs the log), fia; other models: their own explainer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("explain-eval", help="faithfulness of the served explanations against exact leave-one-out "
                                            "(the model `recsys train` fits with the same flags)")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--method", choices=METHODS, default=None,
                   help="the estimate to score (default: what the service serves, cached one-row newton)")
    p.add_argument("--pairs", type=int, default=30, help="test predictions for the agreement test")
    p.add_argument("--candidates", type=int, default=20, help="random candidates per prediction")
    p.add_argument("--removal-pairs", type=int, default=50, help="test predictions for the top-1 removal test")
    p.add_argument("--fold-in-users", type=int, default=20, help="cold users folded in from 5 ratings (0: skip)")
    p.add_argument("--no-noise-floor", action="store_true",
                   help="skip the re-seeded truth (halves the retrains; no noise_floor_spearman)")
    p.add_argument("--workers", type=int, default=1, help="processes for the leave-one-out retrains")
    p.add_argument("--retrain-removals", type=int, default=6,
                   help="rec: training ratings removed and retrained without, each in the served model's "
                        "retraining and in a perturbed replica (the truth: their mean), the first half under "
                        "another seed too (noise floor); about 3 CPU minutes a retrain on ml-100k (default 6: 18 "
                        "retrains); each scores every served prediction that lists it")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="rec: where the retrains keep their results; a run started again there skips those done")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain_eval)


def cmd_datasets(args: argparse.Namespace) -> int:
    from recsys.datasets import available_datasets, data_home, dataset_splits

    print(f"data home: {data_home()}")
    for name in available_datasets():
        print(f"  {name}: splits {', '.join(dataset_splits(name))}")
    return 0


def _print(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "json", False):
        print(text, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model, report held-out accuracy, save it")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--out", type=Path, help="directory to save the trained model in")
    p.add_argument("--rollback", action="store_true",
                   help="record the gradient-rollback log (saved with the model, for `recsys explain`)")
    p.add_argument("--rollback-float16", action="store_true", help="store the rollback log in float16")
    p.add_argument("--rollback-exact", action="store_true",
                   help="record the exact per-example log (2.2x training time) instead of the compact "
                        "one (per-visit errors + table snapshots, ~1.1x; see docs/explanations.md)")
    p.add_argument("--ranker", default=None,
                   help=f"with a rating model: the ranking model fitted on the same rows and saved beside it "
                        f"(in OUT/ranker) for the recommendations (default {DEFAULT_RANKER}; none: no ranker)")
    p.add_argument("--k", type=int, default=10, help="list length of the held-out ranking metrics")
    p.add_argument("--nproc", type=int, default=1,
                   help="train data-parallel in N local processes (torch.distributed: gloo on the CPU, "
                        "NCCL on CUDA; needs --batch-size > 1; or launch with torchrun --nproc-per-node N "
                        "-m recsys.cli train ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="train and evaluate on one or more splits")
    _add_data_args(p)
    _add_model_args(p, default_model=None)
    p.add_argument("--ranking", action="store_true",
                   help=f"ranking metrics (precision/recall/NDCG/MAP@k, coverage); with no --model, of the "
                        f"default ranker ({DEFAULT_RANKER}); a rating model ranks by predicted rating")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict one rating with a saved model")
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("--user", required=True)
    p.add_argument("--item", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("recommend", help="top-k unrated items for a user with a saved model (its ranker)")
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("--user", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("serve", help="serve a model over HTTP (FastAPI + uvicorn)")
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", type=Path, help="SQLite rating store (default: $RECSYS_DB or ./recsys-ratings.sqlite3)")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (default: one per CPU core); each "
                   "loads the model and follows the rating store")
    p.add_argument("--access-log", action="store_true",
                   help="log every request (off by default: it costs CPU per request; /metrics counts requests "
                        "and latency per route)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.set_defaults(func=cmd_serve)

    _add_explain_parsers(sub)

    p = sub.add_parser("datasets", help="list builtin datasets and the data home")
    p.set_defaults(func=cmd_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "evaluate" and args.model is None:
        args.model = DEFAULT_RANKER if args.ranking else "mf"
    try:
        if getattr(args, "model", None) in MODELS:
            _check_model_flags(args)
        return int(args.func(args) or 0)
    except (RecsysError, ValueError, FileNotFoundError) as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recsys: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

