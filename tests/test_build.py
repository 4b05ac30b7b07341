"""Building a run's parts: the persistent compilation cache that build switches on."""

import sys

from runner import run_command, run_main


def test_second_start_loads_the_compiled_steps_from_the_cache(tmp_path):
  cache = tmp_path / "xla_cache"
  args = ("--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
          "--config.num_train_steps=2",
          "--config.batch_size=64", f"--config.compilation_cache_dir={cache}")
  for run in ("first", "second"):
    # JAX_DEBUG_LOG_MODULES: logs each persistent-cache hit.
    result = run_main(tmp_path / run, *args, devices=2,
                      JAX_DEBUG_LOG_MODULES="jax._src.compiler")
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(p.name.startswith("jit_train_step") for p in cache.iterdir())
    hit = "Persistent compilation cache hit for 'jit_train_step'" in result.stderr
    assert hit == (run == "second"), result.stderr[-3000:]


def test_empty_cache_dir_turns_the_cache_off():
  code = ("import jax; from jaxcls import build; build.enable_compilation_cache('');"
          "print(jax.config.jax_enable_compilation_cache)")
  out = run_command([sys.executable, "-c", code], devices=1, timeout=120)
  assert out.stdout.strip() == "False", out.stderr
