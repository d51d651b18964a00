"""TRL's GRPOTrainer drives a live Gorgon server: two steps, weights pushed after each."""

from live_server import start_server, stop_server


def test_two_grpo_steps_advance_the_served_weight_version(llama_dir, tmp_path):
    from examples.grpo_trl import train

    live = start_server(llama_dir, admin_key="admin")
    try:
        versions, final = train(live.url, "admin", llama_dir, steps=2, output_dir=str(tmp_path),
                                max_completion_length=8)
    finally:
        stop_server(live)
    assert versions == [0, 1]          # step 1 sampled from the initial weights, step 2 from the pushed ones
    assert final == 2


def test_grpo_on_the_matched_forward_trains_on_the_rollout_logprobs_exactly(llama_dir, tmp_path):
    """examples/grpo_smollm2.py on the tiny model: TRL's GRPOTrainer with the matched forward. Before each
    update the trainer's logprobs of the step's completions equal the server's rollout logprobs exactly;
    TRL's own float32 forward does not; each step samples from the weights the previous one pushed."""
    from examples.grpo_smollm2 import train

    live = start_server(llama_dir, admin_key="admin")
    try:
        steps = train(2, tmp_path, prompts_per_step=2, generations=4, max_completion_length=8, model=llama_dir,
                      server=live.url, admin_key="admin")
    finally:
        stop_server(live)
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["tokens"] > 0 and s["mismatch_matched"] == 0.0 for s in steps)
    assert all(s["mismatch_trl_float32"] > 0.0 for s in steps)
    assert [set(s["weight_version"]) for s in steps] == [{0}, {1}]
