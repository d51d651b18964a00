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
