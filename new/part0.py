"""A convolutional neural network in pure NumPy, in one file you can read top to bottom.

Part I, the textbook.  Every layer with its forward and backward pass side by side
(Conv2D, MaxPool2D, GlobalMaxPool2D, ReLU, GELU, Flatten, Dense, Scale, BatchNorm2D),
the loss, the optimizers and learning-rate schedules, the Sequential model (forward,
backward, train/eval, summary, save/load), numerical_gradient to check any of them,
and the initialisers.  Convolution and max pooling come in two readable forms:
impl="loop", the formula term by term, and impl="plain", im2col and one matrix
multiply.  Part I uses nothing defined after it: copy it alone and it trains.

Part II, the engine.  The same layers again, faster: impl="fast", the default, builds
them.  They give Part I's numbers up to float32 rounding; everything that exists only
for speed is here (memory layouts, im2col in cache-sized pieces, convolution and
pooling fused, threads, a forked twin process for training, OpenBLAS's thread count,
malloc settings).  It is safe to embed: importing it changes nothing outside this
module, models may run in several threads of your program at once, and a process
forked from yours can run layers.  Set cnn.CORES = 1 to turn all of its own
parallelism off.

Part III, running it.  Data readers and a checked downloader, mini-batches with
augmentation, the training loop with exact resume, metrics, drawing (Pillow, imported
there only), the documented networks, the command line and `python cnn.py bench`.

Arrays are NCHW, (N, C, H, W), float32 unless the parameters are float64.  Only the
standard library and NumPy are imported here.
"""
import argparse
import contextlib
import copy
import gzip
import hashlib
import json
import math
import mmap
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import zipfile

import numpy as np

