"""The paper's attacks on one model, cached per (attack, image, target).

:func:`run_attacks` runs Carlini-Wagner L2 and I-FGSM (L-inf, L2) with
:class:`AttackSettings` on what a cache lacks; ``reproduce_tables.py`` calls it
in its own process and ``sweep_worker.attack_task`` in a Ray task (the same
function, the same records). TensorFlow is imported when the attacks run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

import common
from common import Norm
from paper_tables import Attack, attack_key

log = logging.getLogger("clever.tables")


@dataclass(frozen=True)
class AttackSettings:
    """Everything an attack result depends on besides the model, image and target."""

    cw_iterations: int
    cw_binary_steps: int
    cw_learning_rate: float
    cw_initial_const: float
    cw_confidence: float
    ifgsm_iterations: int
    linf_eps: tuple[float, ...]
    l2_eps: tuple[float, ...]
    ifgsm_losses: tuple[str, ...]   # tried in order, each on the failures of the one before

    def of(self, attack: Attack) -> dict:
        """The settings ``attack``'s results depend on (so I-FGSM changes keep CW's cache)."""
        fields = {Attack.CW_L2: ("cw_iterations", "cw_binary_steps", "cw_learning_rate",
                                 "cw_initial_const", "cw_confidence"),
                  Attack.IFGSM_LINF: ("ifgsm_iterations", "linf_eps", "ifgsm_losses"),
                  Attack.IFGSM_L2: ("ifgsm_iterations", "l2_eps", "ifgsm_losses")}[attack]
        return {f: getattr(self, f) for f in fields}

    def key(self, attack: Attack, dataset: str, model: str, digest: str) -> str:
        """Cache key of ``attack``'s results on a model (weights ``digest``)."""
        text = json.dumps({"attack": attack.value, "dataset": dataset, "model": model,
                           "weights": digest, "settings": self.of(attack)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_attack_cache(path: str) -> dict[str, dict]:
    """Cached records by :func:`attack_key`; an unreadable cache is recomputed, not fatal."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            data = json.load(fh)
        return {attack_key(Attack(r["attack"]), r["id"], r["target"]): r
                for r in data["records"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: unreadable attack cache (%s); recomputing", path, err)
        return {}


def write_attack_cache(path: str, attack: Attack, records: Mapping[str, Mapping],
                       settings: AttackSettings, dataset: str, model: str, digest: str) -> None:
    """Write ``attack``'s records (of all in ``records``) with what produced them."""
    items = sorted((r for r in records.values() if r["attack"] == attack.value),
                   key=lambda r: (r["id"], r["target"]))
    common.write_json(path, {"provenance": common.provenance(), "attack": attack.value,
                             "dataset": dataset, "model": model, "weights_sha256": digest,
                             "settings": settings.of(attack), "records": items})


def _finite(value: float):
    return float(value) if math.isfinite(value) else None


def _attack_record(attack: Attack, img_id: int, target: int, res, k: int, seconds: float,
                   loss: str | None) -> dict:
    """The JSON record of result ``k`` of an AttackResult (null distortions for failures)."""
    rec = {"attack": attack.value, "id": int(img_id), "target": int(target),
           "label": int(res.labels[k]), "success": bool(res.success[k]),
           "l1": _finite(res.l1[k]), "l2": _finite(res.l2[k]), "linf": _finite(res.linf[k]),
           "seconds_batch": seconds}
    if loss is not None:
        rec["loss"] = loss
    if res.eps is not None:
        rec["eps"] = _finite(res.eps[k])
    if res.const is not None:
        rec["const"] = None if math.isnan(res.const[k]) else float(res.const[k])
    return rec


def run_attacks(model, images: Mapping[int, np.ndarray], pairs: Sequence[tuple[int, int]],
                untargeted_ids: Sequence[int], settings: AttackSettings,
                cached: dict[str, dict], save,
                only: Sequence[Attack] = tuple(Attack)) -> tuple[dict[str, dict], int]:
    """Attack what ``cached`` lacks; returns (all records, number computed now).

    ``images``: id -> [H, W, C] float32 in the data range; ``pairs``:
    (id, target class) for the targeted attacks; ``untargeted_ids``: images
    attacked away from their predicted class. I-FGSM runs with each loss of
    ``settings.ifgsm_losses`` in turn on what the previous one failed: the
    cross-entropy gradient vanishes where float32 softmax saturates (the
    distilled model's huge logits), the logit margin's does not. Each record
    says which loss succeeded. ``save`` is called after each attack
    batch (``save(attack, records)``), so an interrupted run keeps what it finished.
    ``only``: the attacks to run (default all).
    """
    import attacks

    cw = attacks.CarliniWagnerL2(
        model, max_iterations=settings.cw_iterations,
        binary_search_steps=settings.cw_binary_steps, learning_rate=settings.cw_learning_rate,
        initial_const=settings.cw_initial_const, confidence=settings.cw_confidence)

    def ifgsm(norm, grid):
        return [(loss, attacks.IterativeFGSM(model, norm=norm, eps_grid=grid,
                                             iterations=settings.ifgsm_iterations,
                                             loss=attacks.IFGSMLoss(loss)))
                for loss in settings.ifgsm_losses]

    runners = {Attack.CW_L2: [(None, cw)],
               Attack.IFGSM_LINF: ifgsm(Norm.LINF, settings.linf_eps),
               Attack.IFGSM_L2: ifgsm(Norm.L2, settings.l2_eps)}
    records = dict(cached)
    computed = 0
    jobs = [(a, list(pairs), True) for a in only] + \
        [(a, [(i, -1) for i in untargeted_ids], False) for a in only]
    for attack, items, targeted in jobs:
        todo = [(i, t) for i, t in items if attack_key(attack, i, t) not in records]
        if not todo:
            continue
        log.info("%s %s: attacking %d (%d cached)", attack.value,
                 "targeted" if targeted else "untargeted", len(todo), len(items) - len(todo))
        x = np.stack([images[i] for i, _ in todo]).astype(np.float32)
        targets = np.array([t for _, t in todo]) if targeted else None
        left = np.arange(len(todo))
        for attempt, (loss, runner) in enumerate(runners[attack]):
            if left.size == 0:
                break
            if attempt:
                log.info("%s: retrying %d failures with the %s loss", attack.value, left.size,
                         loss)
            t0 = time.time()
            res = runner(x[left], targets=None if targets is None else targets[left])
            seconds = time.time() - t0
            for k, idx in enumerate(left):
                img_id, target = todo[idx]
                records[attack_key(attack, img_id, target)] = _attack_record(
                    attack, img_id, target, res, k, seconds, loss)
            left = left[~res.success]
        computed += len(todo)
        save(attack, records)
    return records, computed
