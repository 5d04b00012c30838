"""int8's second gate: a fine-tuned classifier keeps its accuracy within 0.5 points of fp32.

The classifier is MiniLM with a classification head trained on a real task: telling the
docstrings of the standard library's first modules (in sorted file order) from those of its
last ones. The head is fitted on the fp32 [CLS] states of 700 texts (bertrt's torch
lowering); fp32 and int8 are then scored on 500 held-out texts through
`InferenceEngine.predict` on ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bertrt
from bertrt.serve import InferenceEngine
from bertrt.train.corpus import embedded_corpus, read_documents

TRAIN, TEST = 700, 500
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def topic_texts(tmp_path_factory) -> tuple[list[str], np.ndarray]:
    """(texts, labels): docstrings of the corpus' first tenth (0) and last tenth (1),
    shuffled with a fixed seed."""
    corpus = embedded_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=1_500_000)
    docs = [" ".join(d).strip()[:300] for d in read_documents(corpus)]
    docs = [d for d in docs if len(d) > 40]
    tenth = len(docs) // 10
    texts = docs[:tenth] + docs[-tenth:]
    labels = np.array([0] * tenth + [1] * tenth)
    order = np.random.default_rng(0).permutation(len(texts))
    assert len(order) >= TRAIN + TEST
    return [texts[i] for i in order[:TRAIN + TEST]], labels[order[:TRAIN + TEST]]


def cls_states(model: bertrt.Model, texts: list[str]) -> torch.Tensor:
    """The final hidden state of each text's [CLS] token (what the pooler reads)."""
    net = model.to_torch()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            enc = model.tokenizer(texts[start:start + 64], max_length=MAX_LENGTH)
            hidden = net(**{k: torch.as_tensor(v) for k, v in enc.items()})["last_hidden_state"]
            out.append(hidden[:, 0])
    return torch.cat(out)


def test_int8_classifier_accuracy_within_half_a_point_of_fp32(minilm_dir, topic_texts,
                                                             tmp_path):
    texts, labels = topic_texts
    with pytest.warns(UserWarning, match="initialised fresh"):
        model = bertrt.load(minilm_dir, head="classification")
    # fit the head on fp32 features: the pooler's dense layer a fixed 0.1 x identity, so
    # its tanh is nearly linear, and the classifier a logistic regression on its output
    features = torch.tanh(0.1 * cls_states(model, texts[:TRAIN])).double()
    classifier = torch.nn.Linear(384, 2).double()
    target = torch.as_tensor(labels[:TRAIN])
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(features), target) \
            + 1e-3 * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    model.weights["bert.pooler.dense.weight"] = 0.1 * torch.eye(384)
    model.weights["bert.pooler.dense.bias"] = torch.zeros(384)
    model.weights["classifier.weight"] = classifier.weight.detach().float()
    model.weights["classifier.bias"] = classifier.bias.detach().float()
    saved = model.save(tmp_path / "classifier")

    held_out, truth = texts[TRAIN:], labels[TRAIN:]
    accuracy = {}
    for precision in ("fp32", "int8"):
        with InferenceEngine(saved, backend="ort", precision=precision, threads=2,
                             max_length=MAX_LENGTH) as engine:
            assert engine.precision == precision
            got = [int(r["label"].split("_")[-1]) for r in engine.predict(held_out)]
        accuracy[precision] = float(np.mean(np.array(got) == truth))
    assert accuracy["fp32"] >= 0.8, accuracy  # a classifier worth keeping accurate
    assert abs(accuracy["int8"] - accuracy["fp32"]) <= 0.005, accuracy
    print(f"held-out accuracy: {accuracy}")
