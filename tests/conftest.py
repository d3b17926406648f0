import os
import sys

# tests import the top-level files (masking, model, data, ...) as modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
