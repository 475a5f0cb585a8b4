"""Give a bundled encoder a classifier head in the same ONNX graph, as a user's own model has.

qscore serves a model whose ONNX file outputs the user's classifier logits beside the
representation (`[classifier]` in model.toml): `predicted_class` comes from that head, and
`qscore calibrate` predicts that head's mistakes without a predictions file. This recipe makes
such a model from a calibrated bundled encoder, with the calibration's linear probe as the head
(logits = W ((h - mean) / scale) + b), so the head's answers can be checked against the probe's.

Usage (needs the `onnx` package, in .venv-test after `make tools`):

    .venv-test/bin/python models/recipes/add_classifier_head.py \
        --model models/fmnist-simclr --out /tmp/head-models/fmnist-simclr-head

Writes OUT/model.onnx and OUT/model.toml (named after OUT's folder name).
"""

import argparse
import json
import pathlib
import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=pathlib.Path, required=True, help="a calibrated model folder")
    ap.add_argument("--out", type=pathlib.Path, required=True, help="the new model folder")
    args = ap.parse_args()

    cal = json.loads((args.model / "calibration.json").read_text())
    probe = cal["probe"]
    mean = np.asarray(probe["mean"], dtype=np.float32)
    scale = np.asarray(probe["scale"], dtype=np.float32)
    weights = np.asarray(probe["weights"], dtype=np.float32)  # (classes, d)
    bias = np.asarray(probe["bias"], dtype=np.float32)

    graph = onnx.load(str(args.model / "model.onnx"))
    embedding = graph.graph.output[0].name
    init = graph.graph.initializer
    init.extend([
        numpy_helper.from_array(mean, "head_mean"),
        numpy_helper.from_array(scale, "head_scale"),
        numpy_helper.from_array(weights.T.copy(), "head_weights"),
        numpy_helper.from_array(bias, "head_bias"),
    ])
    graph.graph.node.extend([
        helper.make_node("Sub", [embedding, "head_mean"], ["head_centred"]),
        helper.make_node("Div", ["head_centred", "head_scale"], ["head_standard"]),
        helper.make_node("MatMul", ["head_standard", "head_weights"], ["head_scores"]),
        helper.make_node("Add", ["head_scores", "head_bias"], ["logits"]),
    ])
    graph.graph.output.append(
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(probe["classes"])])
    )
    onnx.checker.check_model(graph)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(args.out / "model.onnx"))

    name = args.out.name
    toml = (args.model / "model.toml").read_text()
    toml = re.sub(r'^name = ".*"$', f'name = "{name}"', toml, count=1, flags=re.M)
    classes = ", ".join(json.dumps(c) for c in probe["classes"])
    toml += f'\n[classifier]\noutput = "logits"\nclasses = [{classes}]\n'
    (args.out / "model.toml").write_text(toml)
    print(f"wrote {args.out}/model.onnx with a {len(probe['classes'])}-class head `logits`")


if __name__ == "__main__":
    main()
