"""Score a wav2vec 2.0 upstream on a labelled speech task (SUPERB protocols) over several seeds.

    python recipes/finetune_speech.py --model.path runs/wav2vec2_tiny/model --task.name asterisk-speakers
    python recipes/finetune_speech.py --model.path runs/wav2vec2_tiny/model --task.name asterisk-en-asr \
        --protocol full --seeds [0,1,2]
    python recipes/finetune_speech.py --model.path runs/wav2vec2_tiny/model --task.name my_audiofolder \
        --task.transcript_column transcription --model.init random
    python recipes/finetune_speech.py --model.path runs/wav2vec2_tiny/model --task.name speech-keywords \
        --protocol full --grid.learning_rates [3e-5,1e-4,3e-4] --label_budget 200   # per-arm rate, 200 labels
    python recipes/finetune_speech.py --help   # the values it would use, and the built-in tasks

protocol probe = frozen upstream, softmax-weighted sum of its layers, light head (the learned layer
weights are printed); full = Wav2Vec2ForSequenceClassification / Wav2Vec2ForCTC with the conv
encoder frozen, on the shared trainer, exported for stock `pipeline()`. A mistake prints one line and
exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

from sslcore import config as cfg
from sslcore.api import split_cli  # the --config/--help parsing every recipe shares
from sslcore.errors import DEBUG_HELP, run_cli
from speechssl.finetune import build_speech_finetune_config, finetune
from speechssl.tasks import describe_speech_tasks

USAGE = f"usage: recipes/finetune_speech.py [--config FILE] [--section.key VALUE ...] [--debug] [--help]\n\n{DEBUG_HELP}."


def _main(argv: list[str]):
    path, overrides, show_help = split_cli(argv)
    config = build_speech_finetune_config(path, overrides)
    if show_help:
        print(USAGE, "\n\noptions, with the values this run would use:")
        print("\n".join(cfg.describe(config)))
        print("\nbuilt-in speech tasks (task.name):")
        print("\n".join(f"  {name}: {line}" for name, line in describe_speech_tasks().items()))
        return None
    result = finetune(config=config)
    print(result.summary())
    if result.layer_weights:
        print("learned layer weights per seed (0 = CNN features):", result.layer_weights)
    return result


def main(argv: list[str] | None = None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
