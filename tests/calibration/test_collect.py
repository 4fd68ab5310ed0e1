"""Layer-by-layer calibration helpers on a tiny random decoder."""

import torch

from calibration.collect import capture_layer_inputs, decoder_layers, feed_inputs, input_hooks, run_layer
from pipeline.models import load_torch_model


def test_feed_inputs_gives_every_linear_its_input_and_skips_the_rest_of_the_layer(tiny_llama):
    model = load_torch_model(tiny_llama, attention="sdpa")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_layer_inputs(model, [ids])
    layer = decoder_layers(model)[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    whole, fed = {}, {}
    with input_hooks(linears, lambda name, x: whole.setdefault(name, x)):
        run_layer(layer, hidden, kwargs)
    ran = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda *_: ran.append(True))
    try:
        feed_inputs(layer, hidden[0], kwargs[0], linears, lambda name, x: fed.setdefault(name, x))
    finally:
        handle.remove()
    assert sorted(fed) == sorted(linears) and not ran  # down_proj got its input; its matmul never ran
    for name in linears:
        torch.testing.assert_close(fed[name], whole[name], rtol=0, atol=0)
