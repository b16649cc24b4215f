"""``python -m sam_kernels.info``: what is installed and which backend runs on each device."""

import torch

import sam_kernels
from sam_kernels.backends import report


def main() -> None:
    print(f"sam_kernels {sam_kernels.__version__}, torch {torch.__version__}, "
          f"CUDA available: {torch.cuda.is_available()}")
    print(report())


if __name__ == "__main__":
    main()
