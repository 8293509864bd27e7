"""Test configuration: the repository root is importable, TensorFlow is quiet."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests run on the CPU whatever the machine has, so numbers are reproducible.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
