import asyncio

from decoding import Engine, SamplingParams
from decoding.async_engine import AsyncEngine
from server.cli import main


def test_generate_command_prints_a_completion(llama_dir, capsys):
    assert main(["generate", "def fibonacci(n):", "--model", llama_dir, "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def fibonacci(n):")


def test_generate_command_reports_errors(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "hi", "--temperature", "-1", "--model", str(tmp_path / "missing")]) == 2
    assert "temperature" in capsys.readouterr().err


def test_async_streaming_and_cancellation_free_blocks(llama_dir):
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=128, block_size=4)
    front = AsyncEngine(engine)

    async def stream_all():
        snapshots = []
        async for out in front.generate([1, 5, 9], SamplingParams(temperature=0, max_tokens=12, min_tokens=12)):
            snapshots.append(len(out.outputs[0].token_ids))
        return snapshots

    async def cancel_midway():
        seen = 0
        async for _ in front.generate([1, 5, 9], SamplingParams(max_tokens=200)):
            seen += 1
            if seen == 3:
                break
        await asyncio.sleep(0.2)    # let the engine thread process the abort

    try:
        snapshots = asyncio.run(stream_all())
        assert snapshots[-1] == 12 and len(snapshots) > 1 and snapshots == sorted(snapshots)
        asyncio.run(cancel_midway())
        assert engine.cache_usage().num_used_blocks == 0
        assert not engine.has_unfinished_requests()
    finally:
        front.shutdown()
