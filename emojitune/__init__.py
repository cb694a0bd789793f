"""emojitune: LoRA fine-tuning of Gemma 3 to answer a Japanese tweet with one emoji."""

DEFAULT_MODEL = "google/gemma-3-270m-it"
DEFAULT_SYSTEM_PROMPT = "このツイートを絵文字で感情分類してください"
DEFAULT_CHECKPOINT_DIR = "checkpoints"
