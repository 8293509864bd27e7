"""Target-class selection for stage 1 (TensorFlow-free).

For each test image the model's logits decide the targets, as the original
tool did (docs/format.md): least likely (lowest logit), top-2 (second highest
logit), random (drawn as the original: Python's ``random`` seeded with
``--seed``, ``randint`` over the classes until one is neither the prediction
nor the least-likely nor the top-2 class, one draw per examined image in
order), user-given classes, or every class (untargeted CLEVER). Images the
model misclassifies are skipped.
"""
from __future__ import annotations

import csv
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from common import TargetKind, ToolError, info_string

log = logging.getLogger("clever.utils")

@dataclass(frozen=True)
class Target:
    """One target class of one image: the class index and the file's info."""

    label: int
    kind: TargetKind
    info: str


@dataclass
class ImageTask:
    """An image to score and the targets chosen for it.

    ``image``: float32 array of the model's input shape (no batch axis), in
    the data range. ``logits``: float32 [num_classes] at the image.
    """

    img_id: int
    image: np.ndarray
    true_label: int
    predicted: int
    logits: np.ndarray
    targets: list[Target] = field(default_factory=list)
    seq_no: int = 0
    #: The point ``logits`` were taken at when it is not ``image``: T(x0) with a
    #: transformation (the defended classifier). None: ``image`` itself.
    evaluated: np.ndarray | None = None

    @property
    def model_point(self) -> np.ndarray:
        """Where g(x0) and its gradient are evaluated: T(x0), or x0 without a transformation."""
        return self.image if self.evaluated is None else self.evaluated

    @property
    def correct(self) -> bool:
        return self.true_label == self.predicted


def least_and_top2(logits: np.ndarray, excluded: Sequence[int] = ()) -> tuple[int, int, int]:
    """(predicted, least likely, top-2) classes of one image's logits [num_classes].

    Least likely is the lowest logit, top-2 the second highest (ties: the
    lower class index, as NumPy's argmin). ``excluded`` classes (a background
    class 0) are never the least-likely or top-2 class.
    """
    logits = np.asarray(logits, dtype=np.float64).ravel()
    predicted = int(np.argmax(logits))
    skip = set(int(j) for j in excluded)
    allowed = [j for j in range(logits.size) if j not in skip]
    # sorted() is stable: among equal logits the lower index comes first.
    order = sorted(allowed, key=lambda j: logits[j])
    least = order[0]
    top2 = order[-2] if order[-1] == predicted else order[-1]
    return predicted, least, top2


def draw_random_target(rng: random.Random, num_classes: int, least: int, top2: int,
                       predicted: int, excluded: Sequence[int] = ()) -> int:
    """The original tool's random target: ``randint`` draws until a free class comes up.

    Args:
        rng: Python's ``random`` generator seeded once with ``--seed``; one
            call per examined image, in order, keeps the original's stream.
        num_classes: the model's number of outputs.
        least, top2, predicted: classes the random target must not be.
        excluded: classes never chosen; with a background class 0 the draws
            are ``randint(1, num_classes)`` as the original's (a draw of
            ``num_classes``, past the last class, is drawn again here, where
            the original failed).

    Returns a class index in 0..num_classes-1.
    """
    skip = set(int(j) for j in excluded)
    taken = {int(least), int(top2), int(predicted)}
    start = 1 if 0 in skip else 0
    if not any(j not in skip and j not in taken for j in range(num_classes)):
        # Three or fewer classes: the original would draw for ever; any other class will do.
        free = [j for j in range(num_classes) if j not in skip and j != predicted]
        return free[rng.randrange(len(free))]
    while True:
        j = rng.randint(start, start + num_classes - 1)
        if j < num_classes and j not in skip and j not in taken:
            return j


def select_targets(logits: np.ndarray, kinds: Sequence[TargetKind], img_id: int,
                   user_targets: Sequence[int] | None = None, excluded: Sequence[int] = (),
                   random_class: int | None = None) -> list[Target]:
    """Choose the target classes of one image from its logits.

    Args:
        logits: [num_classes] logits at the clean image.
        kinds: which kinds of targets to produce, in the original's order
            (least, top2, random; ``ALL`` gives every class; ``USER`` with
            ``user_targets`` gives exactly those classes instead).
        img_id: the image (for error messages).
        user_targets: class indices for ``TargetKind.USER`` (from ``--ids``).
        excluded: classes never used as targets (e.g. a background class 0).
        random_class: the random target drawn for this image
            (:func:`draw_random_target`); needed when ``RANDOM`` is in kinds.

    Returns:
        Targets, never the predicted class, without duplicates per kind.
    """
    logits = np.asarray(logits, dtype=np.float64).ravel()
    num_classes = logits.size
    predicted, least, top2 = least_and_top2(logits, excluded)
    allowed = [j for j in range(num_classes) if j not in set(excluded)]
    if TargetKind.ALL in kinds:
        return [Target(j, TargetKind.ALL, info_string(TargetKind.ALL, j))
                for j in allowed if j != predicted]
    if uses_user_targets(kinds, user_targets):
        # As in the original tool, classes listed for an image replace the automatic ones.
        chosen = []
        for j in user_targets:
            if not 0 <= int(j) < num_classes:
                raise ToolError(f"--ids: target class {j} of image {img_id} is not in "
                                f"0..{num_classes - 1}")
            if int(j) != predicted and all(t.label != int(j) for t in chosen):
                chosen.append(Target(int(j), TargetKind.USER, "user"))
        return chosen
    chosen: list[Target] = []
    if TargetKind.LEAST in kinds:
        chosen.append(Target(least, TargetKind.LEAST, "least"))
    if TargetKind.TOP2 in kinds:
        chosen.append(Target(top2, TargetKind.TOP2, "top2"))
    if TargetKind.RANDOM in kinds:
        if random_class is None:
            raise ValueError("select_targets: RANDOM needs the drawn random_class")
        chosen.append(Target(int(random_class), TargetKind.RANDOM, "random"))
    return chosen


def uses_user_targets(kinds: Sequence[TargetKind], user_targets: Sequence[int] | None) -> bool:
    """Whether an image takes its targets from ``--ids`` (then no random draw, as the original)."""
    return TargetKind.ALL not in kinds and TargetKind.USER in kinds and bool(user_targets)


def generate_data(test_data: np.ndarray, test_labels: np.ndarray, logits: np.ndarray,
                  ids: Sequence[int], kinds: Sequence[TargetKind], seed: int,
                  user_targets: dict[int, list[int]] | None = None,
                  excluded: Sequence[int] = (), label_offset: int = 0,
                  evaluated: np.ndarray | None = None) -> list[ImageTask]:
    """Build the stage-1 work list.

    Args:
        test_data: [N, ...] images; test_labels: [N, num_labels] one-hot.
        logits: [len(ids), num_classes] model logits of ``test_data[ids]``
            (of ``evaluated`` when given).
        ids: image indices to examine, in order.
        seed: ``--seed``. The random targets are drawn as the original tool
            drew them: Python's ``random`` seeded once with it, one
            :func:`draw_random_target` per examined image in order
            (misclassified ones too), so the same command picks the same targets.
        label_offset: added to a dataset label to get the model's class index
            (1 for 1001-output ImageNet models with a background class).
        evaluated: [len(ids), ...] the points the logits were taken at, when
            they are not the images themselves (T(x0) with a transformation).

    Returns one :class:`ImageTask` per examined image, misclassified ones
    included (with no targets) so the caller can report them.
    """
    rng = random.Random(seed)  # the same stream as random.seed(seed) in the original
    tasks = []
    for seq_no, (img_id, row) in enumerate(zip(ids, logits), start=1):
        row = np.asarray(row, np.float32)
        true_label = int(np.argmax(test_labels[img_id])) + label_offset
        predicted, least, top2 = least_and_top2(row, excluded)
        mine = (user_targets or {}).get(int(img_id))
        random_class = None
        if not uses_user_targets(kinds, mine):
            random_class = draw_random_target(rng, row.size, least, top2, predicted, excluded)
        task = ImageTask(int(img_id), test_data[img_id], true_label, predicted, row,
                         seq_no=seq_no,
                         evaluated=None if evaluated is None else evaluated[seq_no - 1])
        if task.correct:
            task.targets = select_targets(row, kinds, int(img_id), mine, excluded, random_class)
        tasks.append(task)
    return tasks


def datagen_line(task: ImageTask) -> str:
    """The original tool's ``[DATAGEN][L1]`` line for one examined image."""
    return ("[DATAGEN][L1] no = {}, true_id = {}, true_label = {}, predicted = {}, "
            "correct = {}, seq = {}, info = {}").format(
                task.seq_no, task.img_id, task.true_label, task.predicted, task.correct,
                [t.label for t in task.targets], [t.info for t in task.targets])


def read_ids_file(path: str) -> tuple[list[int], dict[int, list[int]]]:
    """Read an ``--ids`` file: the original tool's TSV or this toolkit's CSV.

    * TSV (the original's, read with pandas): tab-separated, a header row,
      an ``id`` column and optionally a ``target`` column (one target class
      per row, used with bit 3 of ``--target_type`` / ``--targets user``);
      other columns are ignored.
    * CSV: one image per row, ``id[,target,target...]``; a first row that is
      not numeric is taken as a header.

    Returns the ids in file order and, for rows that give targets,
    id -> target classes.
    """
    if not os.path.isfile(path):
        raise ToolError(f"--ids: file {path} does not exist")
    with open(path, newline="") as fh:
        first = next((line for line in fh if line.strip() and not line.startswith("#")), "")
    if "\t" in first:
        ids, targets = _read_ids_tsv(path)
    else:
        ids, targets = _read_ids_csv(path)
    if not ids:
        raise ToolError(f"--ids: file {path} lists no image ids")
    return ids, targets


def _read_ids_tsv(path: str) -> tuple[list[int], dict[int, list[int]]]:
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", comment="#")
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's problem
        raise ToolError(f"--ids: {path}: not a readable tab-separated file ({err})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if "id" not in df.columns:
        raise ToolError(f"--ids: {path}: the tab-separated file has no 'id' column in its header "
                        f"(columns: {', '.join(df.columns)})")
    ids: list[int] = []
    targets: dict[int, list[int]] = {}
    has_target = "target" in df.columns
    for row, (_, rec) in enumerate(df.iterrows(), start=2):  # line 1 is the header
        try:
            img_id = int(rec["id"])
            target = int(rec["target"]) if has_target else None
        except (TypeError, ValueError):
            raise ToolError(f"{path}:{row}: expected integers in the id/target columns") from None
        if img_id < 0:
            raise ToolError(f"{path}:{row}: negative image id {img_id}")
        ids.append(img_id)
        if target is not None:
            targets.setdefault(img_id, []).append(target)
    return ids, targets


def _read_ids_csv(path: str) -> tuple[list[int], dict[int, list[int]]]:
    ids: list[int] = []
    targets: dict[int, list[int]] = {}
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells or cells[0].startswith("#"):
                continue
            try:
                values = [int(c) for c in cells]
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise ToolError(f"{path}:{lineno}: expected integers 'id[,target,...]', "
                                f"got {','.join(cells)!r}")
            if values[0] < 0:
                raise ToolError(f"{path}:{lineno}: negative image id {values[0]}")
            ids.append(values[0])
            if len(values) > 1:
                targets.setdefault(values[0], []).extend(values[1:])
    return ids, targets
