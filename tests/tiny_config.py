"""The test config every training test builds on, and its smallest network."""

import os

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")
# tiny.yaml's network on one level with no attention (no down- or up-sampling): compiles its train step and
# sampling graph in about half the time, for tests whose check (a resume bit for bit, loss scaling, a time
# budget, the files a run writes) does not depend on the layers
FLAT = ["dim_mults=[1]", "mid_attn=false"]
