"""Saves the benchmarks' dummy pair as real checkpoint folders (random weights written by
transformers, the shared tokenizer with `<bigmodel>` / `</bigmodel>` as special tokens), so that
other engines (vLLM's CPU build) can serve exactly the models this engine serves.

    python bench/save_pair.py /tmp/pair          # -> /tmp/pair/small, /tmp/pair/big
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save_random_qwen2, write_dummy_pair  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--small-layers", type=int, default=4)
    p.add_argument("--big-layers", type=int, default=12)
    args = p.parse_args()
    for seed, folder in enumerate(write_dummy_pair(args.root, args.hidden, args.small_layers, args.big_layers)):
        config = json.loads((folder / "config.json").read_text())
        for key in ("architectures", "model_type", "torch_dtype"):
            config.pop(key)
        save_random_qwen2(folder, seed=seed, **config)
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # how transformers-based servers load it
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False))
        print(folder)


if __name__ == "__main__":
    main()
