"""stage1_run.collect: stage 1 as a library call, the same numbers as the CLI's files."""
import glob
import os

import numpy as np
import pytest
import scipy.io

import models
import stage1_run
from common import ToolError
from settings import Stage1Settings

SMALL = dict(numimg=2, Nsamps=16, Niters=4, targets="top2,least", seed=7, no_progress=True)


def test_collect_writes_the_files_it_returns(tmp_path, linear_model_path):
    s = Stage1Settings.from_kwargs(model_path=linear_model_path, save=str(tmp_path), **SMALL)
    seen = []
    results = stage1_run.collect(s, out_dir=s.out_dir(), on_file=seen.append)
    assert seen == results and len(results) == 4
    files = sorted(glob.glob(os.path.join(s.out_dir(), "*.mat")))
    assert sorted(r.path for r in results) == files
    for r in results:
        d = scipy.io.loadmat(r.path)
        assert (d["id"].item(), d["target_label"].item(), d["info"].item()) == \
            (r.image_id, r.target_label, r.info)
        for key in ("G1_max", "G2_max", "Gi_max", "L2_max"):
            np.testing.assert_array_equal(d[key].ravel(), r.record[key])
        assert r.record["g_x0"] == d["g_x0"].item()
    # A rerun keeps the files and computes nothing.
    assert stage1_run.collect(s, out_dir=s.out_dir()) == []


def test_collect_in_memory_model_and_images_writes_nothing(tmp_path, linear_model_path):
    s = Stage1Settings.from_kwargs(model_path=linear_model_path, save=str(tmp_path), **SMALL)
    on_disk = {(r.image_id, r.target_label): r.record
               for r in stage1_run.collect(s, out_dir=s.out_dir())}
    model = models.load_model("digits", model_path=linear_model_path)
    data = models.load_dataset("digits")
    images, labels = data.test_data[:2], np.argmax(data.test_labels[:2], axis=1)
    before = set(os.listdir(tmp_path))
    results = stage1_run.collect(s, model=model, images=images, labels=labels)
    assert set(os.listdir(tmp_path)) == before
    assert all(r.path is None for r in results) and len(results) == len(on_disk)
    for r in results:  # the same seeds, the same images: the same maxima
        ref = on_disk[(r.image_id, r.target_label)]
        np.testing.assert_allclose(r.record["G2_max"], ref["G2_max"], rtol=1e-6)
        assert r.record["path"].endswith(".mat") and os.sep not in r.record["path"]
    # Without labels the model's own classes are the true labels: nothing is skipped.
    own = stage1_run.collect(s, model=model, images=images)
    assert all(r.true_label == r.pred_label for r in own) and len(own) == 4


def test_collect_rejects_bad_images():
    s = Stage1Settings.from_kwargs(**SMALL)
    with pytest.raises(ToolError, match="^images: expected float32"):
        stage1_run.collect(s, model=None, images=np.zeros((3, 8, 8)))
