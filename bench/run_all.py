"""Run every benchmark in one process group and print their ratios (`make bench`): four hours and
more on 2 cores, most of it the multi-seed result tables and the LM teachers' pretraining (once).
Run on a quiet machine: the ratios are measured side by side, but other load still adds noise."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cache_size, cached_vs_online, student_speed, teach_memory, teach_throughput  # noqa: E402
from bench.common import RESULTS  # noqa: E402

if __name__ == "__main__":
    for name, mod in [
        ("cache size / fidelity", cache_size),
        ("cached vs online", cached_vs_online),
        ("student vs teacher speed", student_speed),
        ("teach throughput", teach_throughput),
        ("teach memory", teach_memory),
    ]:
        print(f"== {name}")
        mod.main()
    from bench import minilm_cached_vs_online, minilm_speed

    print("== MiniLM cached vs online")
    minilm_cached_vs_online.main()
    from bench import minilm_quality

    print("== MiniLM quality tables (distil, m2mKD vs their twins) and cache KB/row")
    minilm_quality.main([])
    print("== the narrow MiniLM student (width 192)")
    minilm_quality.main(["--only", "narrow", "--out", str(RESULTS / "minilm_narrow.json")])
    print("== MiniLM student vs teacher")
    sys.argv = sys.argv[:1]
    minilm_speed.main()
    from bench import demo_time, streamed_vs_materialised

    print("== demo end to end, before vs after")
    demo_time.main(["--repeat", "2"])
    print("== distil epochs: streamed views vs the driver-materialised join")
    streamed_vs_materialised.main()
    from bench import compare_methods, lm_cache, lm_fusion, lm_methods, lm_teach_throughput, lm_train_step

    print("== causal-LM cache bytes / fidelity")
    lm_cache.main()
    print("== causal-LM teach throughput")
    lm_teach_throughput.main(sizes=(1000, 4000))
    print("== causal-LM training step: sparse vs dense, cached vs online, dynamic padding")
    lm_train_step.main([])
    print("== methods vs their baselines, 3 seeds (digits fusion, aspects, self-distillation)")
    compare_methods.main([])
    print("== more variants: KD + CE + aspects, a CE twin trained twice as long (3 seeds)")
    compare_methods.main(["--extra"])
    print("== causal-LM objectives vs the CE twin, 3 seeds (1 epoch each, as the README's table)")
    lm_methods.main(["--epochs", "1"])
    print("== causal-LM experts, their fusions and a student from each (1 epoch each, as the README's table)")
    lm_fusion.main(["--epochs", "1", "--seeds", "0", "1", "2"])
    from bench import text_classifier

    print("== text classifier: KD student vs labels-only twin vs Well-Read, 3 seeds")
    text_classifier.main([])
    print("== text classifier with labels on 10 % of the train glosses: KD vs the twin on that 10 %")
    text_classifier.main(["--no-well-read", "--labeled-fraction", "0.1"])
    from bench import hierarchical

    print("== hierarchical self-distillation: every exit with and without the exit-to-exit KL, 3 seeds")
    hierarchical.main([])
    print("== text classifier exits vs the fine-tuned teacher, sentences/s")
    root = Path(__file__).resolve().parent.parent
    sys.argv = [
        sys.argv[0],
        "--spec",
        str(root / "pipelines" / "text_classifier_hierarchical.yaml"),
        "--rounds",
        "3",
        "--sentences",
        "384",
        "--out",
        str(RESULTS / "text_classifier_speed.json"),
    ]
    minilm_speed.main()
    from bench import exit_probe

    print("== why the shallow exits need the standardising fold: a head on frozen teacher states")
    exit_probe.main([])
    from bench import exit_cost, pipeline_runs, platform_costs

    print("== each shipped spec as a new user runs it: kdpipe run from an empty directory, per stage")
    pipeline_runs.main([])
    print("== the end of the demo: ray.shutdown by process, and the exit with and without the final GC")
    exit_cost.main([])
    print("== Ray's and PyTorch's fixed costs on this machine (the platform notes)")
    platform_costs.main([])
    from bench import driver_memory, suite_time

    print("== the default test suite on a clean clone, as CI runs it")
    suite_time.main([])
    print("== driver peak RSS of a full run at N and 10 N rows (digits 100,000; MiniLM 2,000)")
    driver_memory.main()
