from runtime.io_spec import Contract


def test_contract_names_shapes_and_axes():
    c = Contract("portable", num_layers=2, num_kv_heads=3, head_dim=64, vocab_size=100)
    assert [s.name for s in c.inputs()][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert c.present_names() == ["present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    axes = c.dynamic_axes()
    assert axes["past_key_values.1.value"] == {0: "batch_size", 2: "past_sequence_length"}
    assert axes["logits"] == {0: "batch_size", 1: "sequence_length"}
    assert c.kv_bytes_per_token() == 2 * 2 * 3 * 64 * 4


def test_contract_round_trips(tmp_path):
    c = Contract("portable", 2, 3, 64, 100)
    c.save(tmp_path)
    assert Contract.load(tmp_path) == c
