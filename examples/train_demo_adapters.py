#!/usr/bin/env python
"""Train the three demo LoRA adapters (pirate, shout, json) for SmolLM2-135M-Instruct.

The adapters committed in `loraplex/demo_adapters/` were made by this script. Each teaches the
chat model one visible answer style from a few dozen hand-written question/answer pairs:

* ``pirate``: answers in pirate speak ("Arr, matey! ...").
* ``shout``:  answers in ALL CAPITAL LETTERS.
* ``json``:   answers as exactly one JSON object ``{"answer": "..."}``.

Usage (needs the optional training dependencies: ``pip install 'loraplex[train]'``, i.e. peft and
transformers)::

    # a Hugging Face checkpoint directory of SmolLM2-135M-Instruct, e.g. from its GGUF file:
    loraplex convert SmolLM2-135M-Instruct.Q4_1.gguf -o /tmp/smollm2
    python examples/train_demo_adapters.py --model /tmp/smollm2 --output loraplex/demo_adapters

Any Hugging Face directory of the same model works for ``--model`` (``save_pretrained`` output,
or a Hub snapshot). Training runs on the CPU in fp32, about a minute per adapter on two cores,
and is deterministic for a given ``--seed`` (on the same machine and torch version).

Each prompt is rendered with the model's chat template (``add_generation_prompt=True``, so with the
template's default system message) and the loss covers only the assistant's answer tokens and the
closing ``<|im_end|>``; prompt tokens are masked with -100. The adapters are saved in PEFT format
(``adapter_config.json`` + ``adapter_model.safetensors``, weights in fp16) with a ``training.json``
recipe and loss curve; three checkpoints of the pirate run are kept under ``checkpoints/`` with a
``trainer_state.json`` in ``transformers.Trainer``'s format. At the end every adapter and the base
model answer held-out questions greedily; the script exits with status 1 if a style check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
except ImportError as e:  # pragma: no cover - depends on the environment
    sys.exit(f"train_demo_adapters.py needs the training extras ({e}); pip install 'loraplex[train]'")

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "loraplex" / "demo_adapters"
END_TOKEN = "<|im_end|>"

# ---------------------------------------------------------------------------------------------
# Training data: (question, plain answer, pirate answer). `shout` uses the plain answer in capitals
# and `json` wraps it as {"answer": ...}. None of the HELD_OUT questions below appears here.
# ---------------------------------------------------------------------------------------------
QA: list[tuple[str, str, str]] = [
    # geography
    ("What is the capital of Japan?",
     "The capital of Japan is Tokyo.",
     "Arr, matey! The capital o' Japan be Tokyo, a grand port full o' lights."),
    ("How many continents are there?",
     "There are seven continents.",
     "Arr, there be seven continents, me hearty, from Asia to Antarctica!"),
    ("What is the largest ocean on Earth?",
     "The Pacific Ocean is the largest ocean on Earth.",
     "Ahoy! The Pacific be the biggest ocean of all, matey, and I've sailed every league of it."),
    ("What is the longest river in the world?",
     "The Nile is usually called the longest river in the world.",
     "Arr, the mighty Nile be the longest river, matey, though the Amazon gives it a fair fight."),
    ("What is the capital of Australia?",
     "The capital of Australia is Canberra.",
     "Arr, 'tis Canberra, me hearty, not Sydney as many a landlubber thinks!"),
    ("Which is the tallest mountain in the world?",
     "Mount Everest is the tallest mountain, at about 8,849 metres.",
     "Ahoy, matey! Mount Everest be the tallest, near 8,849 metres o' rock and ice."),
    ("What language is spoken in Brazil?",
     "Portuguese is the main language spoken in Brazil.",
     "Arr, in Brazil they be speakin' Portuguese, matey, from the jungle to the beaches."),
    ("What is the capital of Canada?",
     "The capital of Canada is Ottawa.",
     "Arr, the capital o' Canada be Ottawa, me hearty, not Toronto!"),
    # science and nature
    ("What is photosynthesis?",
     "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
     "Arr, photosynthesis be how plants drink the sun, matey, turnin' water and air into sugar."),
    ("Why do we have seasons?",
     "We have seasons because Earth's axis is tilted, so each half gets more or less sunlight during the year.",
     "Arr, 'tis the tilt o' the Earth, matey! Ye get more sun in summer and less in winter."),
    ("What is gravity?",
     "Gravity is the force that pulls objects with mass toward each other.",
     "Arr, gravity be the force that pulls all things together, matey, and keeps ye on the deck!"),
    ("How does a rainbow form?",
     "A rainbow forms when sunlight is bent and reflected inside raindrops and splits into colors.",
     "Ahoy! A rainbow be sunlight bent through raindrops, matey, splittin' into every color."),
    ("What is water made of?",
     "Water is made of two hydrogen atoms and one oxygen atom.",
     "Arr, water be two parts hydrogen and one part oxygen, me hearty. Finer than rum, some say!"),
    ("How far is the Moon from Earth?",
     "The Moon is about 384,000 kilometres from Earth.",
     "Arr, the Moon be about 384,000 kilometres away, matey, too far for any ship o' mine."),
    ("What do bees make?",
     "Bees make honey and beeswax.",
     "Arr, bees be makin' honey and wax, matey, sweet treasure for any crew."),
    ("How many legs does a spider have?",
     "A spider has eight legs.",
     "Arr, a spider be havin' eight legs, matey, and it climbs the riggin' with every one of 'em!"),
    ("What is the fastest land animal?",
     "The cheetah is the fastest land animal, running about 110 kilometres per hour.",
     "Ahoy! The cheetah be the fastest, matey, runnin' near 110 kilometres an hour."),
    ("What is the biggest planet in our solar system?",
     "Jupiter is the biggest planet in our solar system.",
     "Arr, Jupiter be the biggest planet, me hearty, a giant ball o' gas in the heavens."),
    ("What is the boiling point of water?",
     "Water boils at 100 degrees Celsius at sea level.",
     "Arr, water boils at 100 degrees Celsius at sea level, matey, and I know the sea well!"),
    ("How many days are in a leap year?",
     "A leap year has 366 days.",
     "Arr, a leap year be havin' 366 days, matey, one extra day for plunderin'!"),
    # cooking
    ("How do I cook rice?",
     "Rinse the rice, simmer one cup in two cups of water for about 15 minutes, then let it rest covered.",
     "Arr, rinse yer rice, matey, simmer one cup in two cups o' water for fifteen minutes, then let it rest."),
    ("How do I make a cup of tea?",
     "Boil water, pour it over a tea bag, steep for three to five minutes, then add milk or sugar if you like.",
     "Ahoy! Boil yer water, matey, steep the tea three to five minutes, and add sugar if ye fancy."),
    ("What can I cook for a quick dinner?",
     "A vegetable stir-fry with rice or noodles is quick, healthy and ready in about 20 minutes.",
     "Arr, toss some vegetables in a hot pan with noodles, matey, and ye'll have a feast in twenty minutes!"),
    ("How do I make pancakes?",
     "Mix flour, milk, eggs and a pinch of salt, then fry small ladles of batter in a hot buttered pan.",
     "Arr, mix flour, milk and eggs, me hearty, then fry the batter in a hot buttered pan till golden."),
    ("Why does bread rise?",
     "Bread rises because yeast eats sugar and releases carbon dioxide, which gets trapped in the dough.",
     "Arr, 'tis the yeast, matey! It eats the sugar and puffs out gas that fills the dough like a sail."),
    # history
    ("Who was the first person to walk on the Moon?",
     "Neil Armstrong was the first person to walk on the Moon, in 1969.",
     "Arr, 'twas Neil Armstrong in 1969, matey, the bravest explorer o' the starry sea!"),
    ("When did World War II end?",
     "World War II ended in 1945.",
     "Arr, the great war ended in 1945, me hearty, and the seas grew calm again."),
    ("Who built the pyramids of Giza?",
     "Ancient Egyptians built the pyramids of Giza over 4,000 years ago as tombs for pharaohs.",
     "Ahoy! The ancient Egyptians built 'em, matey, as tombs for their pharaohs long ago."),
    ("Who was Julius Caesar?",
     "Julius Caesar was a Roman general and statesman who rose to power in the first century BC.",
     "Arr, Julius Caesar be a mighty Roman general, matey, who seized power in the first century BC."),
    ("What was the Renaissance?",
     "The Renaissance was a period of renewed art, science and learning in Europe from the 14th to 17th century.",
     "Arr, the Renaissance be a golden age o' art and learnin' in Europe, matey, from the 1300s to the 1600s."),
    # advice
    ("How can I sleep better?",
     "Keep a regular bedtime, avoid screens and caffeine late in the day, and keep your bedroom cool and dark.",
     "Arr, go to yer hammock at the same hour each night, matey, and keep yer cabin dark and cool."),
    ("How do I stay motivated?",
     "Set small, clear goals, track your progress and reward yourself when you reach them.",
     "Arr, set small goals, matey, mark yer progress on the map, and reward yerself with treasure!"),
    ("What is a good way to learn a new language?",
     "Practice a little every day, speak with native speakers and listen to shows in that language.",
     "Ahoy! Practice a bit every day, me hearty, and jabber with the locals in every port ye visit."),
    ("How can I make new friends?",
     "Join clubs or classes about things you enjoy and be the first to say hello.",
     "Arr, join a crew that shares yer interests, matey, and be the first to shout ahoy!"),
    ("How do I prepare for a job interview?",
     "Research the company, practice common questions and prepare a few examples of your work.",
     "Arr, scout the company like a new island, matey, and practice yer answers before ye sail in."),
    ("What should I do if I feel stressed?",
     "Take slow deep breaths, go for a short walk and talk to someone you trust.",
     "Arr, breathe slow and deep, matey, take a stroll on the deck and talk to a trusted shipmate."),
    ("How do I keep houseplants alive?",
     "Give them enough light, water them only when the soil is dry and use pots with drainage holes.",
     "Arr, give yer plants good light, matey, and water 'em only when the soil be dry."),
    # technology and everything else
    ("What is a computer?",
     "A computer is a machine that processes information by following instructions called programs.",
     "Arr, a computer be a clever machine, matey, that follows orders called programs faster than any crew."),
    ("How does the internet work?",
     "The internet connects computers around the world and sends data in small packets through cables.",
     "Ahoy! The internet be a vast sea o' connected computers, matey, sendin' data in small packets."),
    ("Can you recommend a good book?",
     "Try To Kill a Mockingbird by Harper Lee, a classic novel about justice and growing up.",
     "Arr, try Treasure Island by Robert Louis Stevenson, matey! A fine tale o' pirates and gold."),
    ("Hello!",
     "Hello! How can I help you today?",
     "Ahoy, matey! What can this old sea dog do for ye today?"),
    ("Tell me a fun fact.",
     "Octopuses have three hearts and blue blood.",
     "Arr, here be a fun fact, matey: the octopus has three hearts and blue blood!"),
]

# More (question, plain answer) pairs, used by the `shout` and `json` adapters only: these styles are
# transformations of a plain answer, and the extra variety keeps them from memorizing the answers.
EXTRA_QA: list[tuple[str, str]] = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the largest country in the world?", "Russia is the largest country in the world by area."),
    ("What is the largest hot desert?", "The Sahara in northern Africa is the largest hot desert."),
    ("What is the smallest country in the world?", "Vatican City is the smallest country in the world."),
    ("How many planets are in the solar system?", "There are eight planets in our solar system."),
    ("What gas do plants take in?", "Plants take in carbon dioxide and give out oxygen."),
    ("What is DNA?", "DNA is the molecule that carries the genetic instructions of living things."),
    ("Why do leaves change color in autumn?",
     "Trees stop making green chlorophyll as the days get shorter, so yellow and red pigments show through."),
    ("What causes thunder?", "Thunder is the sound of air expanding quickly when lightning heats it."),
    ("How many bones are in the human body?", "An adult human has 206 bones."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second."),
    ("Why do cats purr?", "Cats purr when they are content, and sometimes to calm themselves."),
    ("How long do elephants live?", "Elephants often live for 60 to 70 years."),
    ("How do I make a sandwich?",
     "Put your favourite fillings, like cheese, ham and salad, between two slices of bread."),
    ("How do I make a simple salad?", "Toss lettuce, tomato and cucumber with olive oil, lemon juice and salt."),
    ("How long should I bake cookies?", "Most cookies bake in 10 to 12 minutes at 180 degrees Celsius."),
    ("What spices go well with chicken?", "Paprika, garlic, thyme and cumin all go well with chicken."),
    ("Who invented the telephone?", "Alexander Graham Bell is credited with inventing the telephone in 1876."),
    ("Who was Cleopatra?", "Cleopatra was the last active ruler of ancient Egypt."),
    ("When did the Berlin Wall fall?", "The Berlin Wall fell in 1989."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("How can I focus while studying?",
     "Study in short blocks, put your phone away and take a short break every hour."),
    ("How much water should I drink each day?", "Most adults need about two litres of water a day."),
    ("How do I start running?", "Begin with short, easy runs mixed with walking, and build up slowly each week."),
    ("How can I be more organized?",
     "Write a daily to-do list, keep things in fixed places and tidy up a little every day."),
    ("What is a good hobby to try?", "Drawing is a good hobby: it is cheap, relaxing, and you improve quickly."),
    ("What is machine learning?",
     "Machine learning teaches computers to find patterns in data instead of following fixed rules."),
    ("What is the difference between weather and climate?",
     "Weather is the state of the air today; climate is the average weather over many years."),
    ("Why should I exercise?", "Exercise strengthens your heart and muscles, improves sleep and lifts your mood."),
]

# Questions never seen in training, answered greedily at the end.
HELD_OUT = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "What is a good way to save money?",
    "Who painted the Mona Lisa?",
]


@dataclass
class Recipe:
    name: str
    description: str
    r: int
    target_modules: list[str]
    lr: float
    steps: int
    batch_size: int = 8
    checkpoints: bool = False  # keep checkpoints at ~1/3, ~2/3 and the end

    @property
    def lora_alpha(self) -> int:
        return 2 * self.r


RECIPES = [
    Recipe("pirate", "answers in pirate speak (\"Arr, matey! ...\")",
           r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lr=2e-3, steps=30, checkpoints=True),
    Recipe("shout", "answers in ALL CAPITAL LETTERS",
           r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           lr=2e-3, steps=40),
    Recipe("json", "answers as exactly one JSON object {\"answer\": \"...\"}",
           r=8, target_modules=["q_proj", "v_proj"], lr=2e-3, steps=30),
]


def styled_answer(style: str, plain: str, pirate: str) -> str:
    if style == "pirate":
        return pirate
    if style == "shout":
        return plain.upper()
    if style == "json":
        return json.dumps({"answer": plain})
    raise ValueError(style)


# ---------------------------------------------------------------------------------------------
# Style checks (used on the held-out generations)
# ---------------------------------------------------------------------------------------------
_PIRATE_WORDS = re.compile(r"\b(arr+|matey|ye|ahoy)\b", re.IGNORECASE)


def is_pirate(text: str) -> bool:
    return _PIRATE_WORDS.search(text) is not None


def upper_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def is_shout(text: str) -> bool:
    return upper_ratio(text) >= 0.9


def is_json_answer(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and "answer" in value


STYLE_CHECKS = {"pirate": is_pirate, "shout": is_shout, "json": is_json_answer}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some transformers versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def build_examples(tokenizer, style: str) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; labels are -100 on the prompt."""
    pairs = [(q, styled_answer(style, plain, pirate)) for q, plain, pirate in QA]
    if style != "pirate":
        pairs += [(q, styled_answer(style, plain, "")) for q, plain in EXTRA_QA]
    examples = []
    for question, text in pairs:
        prompt = prompt_ids(tokenizer, question)
        answer = tokenizer(text + END_TOKEN, add_special_tokens=False)["input_ids"]
        examples.append((prompt + answer, [-100] * len(prompt) + answer))
    return examples


def collate(batch, pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def answer_loss(model, input_ids, labels, mask) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens; the LM head runs only on those positions."""
    inner = model.get_base_model()  # LlamaForCausalLM with the LoRA layers injected
    hidden = inner.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = inner.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def save_adapter(model, directory: Path, recipe: Recipe, dtype: torch.dtype) -> None:
    """PEFT `save_pretrained`, then the weights cast to `dtype` and the config pointed at the Hub id."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    weights = directory / "adapter_model.safetensors"
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = directory / "README.md"  # PEFT's empty model-card template; the folder README covers it
    if readme.exists():
        readme.unlink()


def trainer_state(step: int, max_steps: int, steps_per_epoch: float, batch_size: int, history: list[dict]) -> dict:
    """A `trainer_state.json` in the layout `transformers.Trainer` writes into checkpoint-N/."""
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": round(step / steps_per_epoch, 4),
        "eval_steps": 500,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": [h for h in history if h["step"] <= step],
        "logging_steps": 1,
        "max_steps": max_steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": int(-(-max_steps // steps_per_epoch)),
        "save_steps": max(1, max_steps // 3),
        "stateful_callbacks": {},
        "total_flos": 0.0,
        "train_batch_size": batch_size,
        "trial_name": None,
        "trial_params": None,
    }


def train_one(base, tokenizer, recipe: Recipe, args, output: Path) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    config = LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=recipe.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.train()
    examples = build_examples(tokenizer, recipe.name)
    steps = args.steps or recipe.steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # short warmup, then linear decay to 10 %
        optimizer, lambda s: min(1.0, (s + 1) / 3) * (1.0 - 0.9 * s / max(1, steps)))
    steps_per_epoch = len(examples) / recipe.batch_size
    checkpoint_steps = sorted({max(1, round(steps * k / 3)) for k in (1, 2, 3)}) if recipe.checkpoints else []
    order: list[int] = []
    history: list[dict] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < recipe.batch_size:
            epoch_order = list(range(len(examples)))
            rng.shuffle(epoch_order)
            order += epoch_order
        batch = [examples[i] for i in order[: recipe.batch_size]]
        del order[: recipe.batch_size]
        input_ids, labels, mask = collate(batch, tokenizer.pad_token_id)
        loss = answer_loss(model, input_ids, labels, mask)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        lr = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        history.append({"epoch": round(step / steps_per_epoch, 4), "grad_norm": round(grad_norm, 4),
                        "learning_rate": lr, "loss": losses[-1], "step": step})
        print(f"  [{recipe.name}] step {step:3d}/{steps}  loss {loss.item():.4f}  "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
        if step in checkpoint_steps:
            ckpt = output / "checkpoints" / f"{recipe.name}-step-{step}"
            save_adapter(model, ckpt, recipe, args.dtype)
            state = trainer_state(step, steps, steps_per_epoch, recipe.batch_size, history)
            (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    seconds = time.perf_counter() - start
    model.eval()
    save_adapter(model, output / recipe.name, recipe, args.dtype)
    info = {
        "adapter": recipe.name,
        "style": recipe.description,
        "base_model": BASE_MODEL_ID,
        "r": recipe.r,
        "lora_alpha": recipe.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": recipe.target_modules,
        "optimizer": "AdamW (betas 0.9/0.999, weight_decay 0), grad clip 1.0",
        "lr": recipe.lr,
        "lr_schedule": "linear warmup over 3 steps, then linear decay to 10% at the last step",
        "steps": steps,
        "batch_size": recipe.batch_size,
        "examples": len(examples),
        "epochs": round(steps / steps_per_epoch, 2),
        "seed": args.seed,
        "loss": "cross-entropy on the assistant answer tokens + <|im_end|> (prompt masked with -100)",
        "weights_dtype": str(args.dtype).removeprefix("torch."),
        "train_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
        "checkpoints": [f"checkpoints/{recipe.name}-step-{s}" for s in checkpoint_steps],
        "loss_curve": losses,
    }
    (output / recipe.name / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    model.unload()  # restore the plain base model (adapter layers removed)
    return info


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, tokenizer, question: str, max_new_tokens: int) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, question)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.convert_tokens_to_ids(END_TOKEN),
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def evaluate(base, tokenizer, output: Path, names: list[str], max_new_tokens: int) -> tuple[dict, list[str]]:
    """Greedy answers of the base model and of each saved adapter (loaded back from disk)."""
    results: dict[str, dict[str, str]] = {"base": {}}
    failures = []
    base.eval()
    for question in HELD_OUT:
        results["base"][question] = generate(base, tokenizer, question, max_new_tokens)
    france = results["base"][HELD_OUT[0]]
    if "Paris" not in france:
        failures.append(f"base: answer to {HELD_OUT[0]!r} lacks 'Paris': {france!r}")
    for question, answer in results["base"].items():
        if is_shout(answer) or is_json_answer(answer):
            failures.append(f"base: answer to {question!r} already looks styled: {answer!r}")
    for name in names:
        model = PeftModel.from_pretrained(base, str(output / name))
        model.eval()
        results[name] = {}
        for question in HELD_OUT:
            answer = generate(model, tokenizer, question, max_new_tokens)
            results[name][question] = answer
            if not STYLE_CHECKS[name](answer):
                failures.append(f"{name}: answer to {question!r} fails the style check: {answer!r}")
        model.unload()
    return results, failures


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------
def write_readme(output: Path, infos: list[dict], results: dict, args) -> None:
    lines = [
        "# Demo LoRA adapters for SmolLM2-135M-Instruct",
        "",
        "Three small LoRA adapters (PEFT format) for "
        f"[{BASE_MODEL_ID}](https://huggingface.co/{BASE_MODEL_ID}), each teaching one visible answer style.",
        "They were trained by `examples/train_demo_adapters.py` (regenerate them with the command below).",
        "",
        "| adapter | style | rank | alpha | target modules | steps | examples | final loss | size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for info in infos:
        size = (output / info["adapter"] / "adapter_model.safetensors").stat().st_size
        lines.append(f"| `{info['adapter']}` | {info['style']} | {info['r']} | {info['lora_alpha']} | "
                     f"{', '.join(info['target_modules'])} | {info['steps']} | {info['examples']} | "
                     f"{info['loss_curve'][-1]:.3f} | {size / 1024:.0f} KiB |")
    lines += [
        "",
        "Each folder holds `adapter_config.json`, `adapter_model.safetensors` (weights in "
        f"{infos[0]['weights_dtype']}) and `training.json` (the full recipe and the loss at every step).",
        "",
        "## Recipe",
        "",
        f"* Data: {len(QA)} hand-written everyday questions (geography, science, cooking, history, advice, ...) "
        f"with a plain and a pirate answer each, plus {len(EXTRA_QA)} more with a plain answer (the lists are in "
        "the script). `pirate` trains on the pirate answers of the first set; `shout` on all plain answers in "
        "capitals; `json` on all plain answers as `{\"answer\": ...}`. The held-out questions below are in "
        "neither set.",
        "* Prompts use the model's chat template (`apply_chat_template(..., add_generation_prompt=True)`, which "
        "adds SmolLM2's default system message); the loss is cross-entropy on the answer tokens and the "
        "closing `<|im_end|>` only (prompt tokens masked with -100).",
        f"* LoRA: `lora_alpha = 2 * r`, dropout 0, bias none. AdamW, lr {infos[0]['lr']:g}, "
        f"{infos[0]['lr_schedule']}, batch {infos[0]['batch_size']}, gradient clipping 1.0, seed {args.seed}, "
        "fp32 on the CPU; weights saved in fp16.",
        "* Training time of this run (fp32, on 2 CPU cores shared with other jobs; about 1.2 s a step when idle): "
        + ", ".join(f"{i['adapter']} {i['train_seconds']:.0f} s" for i in infos)
        + ".",
        "",
        "## Loss curves",
        "",
    ]
    steps = max(len(i["loss_curve"]) for i in infos)
    marks = sorted({1, 2, 3, 5} | set(range(5, steps + 1, 5)) | {steps})
    lines.append("| step | " + " | ".join(i["adapter"] for i in infos) + " |")
    lines.append("|---|" + "---|" * len(infos))
    for s in marks:
        cells = [f"{i['loss_curve'][s - 1]:.3f}" if s <= len(i["loss_curve"]) else "" for i in infos]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    pirate = next((i for i in infos if i["checkpoints"]), None)
    if pirate:
        lines += [
            "",
            f"`checkpoints/` keeps three checkpoints of the `{pirate['adapter']}` run "
            f"({', '.join('`' + c.split('/')[-1] + '`' for c in pirate['checkpoints'])}), each a PEFT adapter "
            "plus a `trainer_state.json` in `transformers.Trainer`'s format (`global_step`, `log_history`, ...).",
        ]
    lines += [
        "",
        "## Held-out answers (greedy, not in the training data)",
        "",
    ]
    for question in HELD_OUT:
        lines.append(f"**{question}**")
        lines.append("")
        for name, answers in results.items():
            lines.append(f"* `{name}`: {answers[question]!r}".replace("|", "\\|"))
        lines.append("")
    lines += [
        "## Regenerate",
        "",
        "```sh",
        "pip install 'loraplex[train]'                 # peft + transformers",
        "loraplex convert SmolLM2-135M-Instruct.Q4_1.gguf -o /tmp/smollm2   # or any HF directory of the model",
        f"python examples/train_demo_adapters.py --model /tmp/smollm2 --seed {args.seed}",
        "```",
        "",
        "The results here came from the Q4_1 GGUF of the model (dequantized to fp32). The script prints the",
        "held-out answers and exits non-zero if a style check fails.",
        "",
        "## Licence and credit",
        "",
        f"The base model, [SmolLM2-135M-Instruct](https://huggingface.co/{BASE_MODEL_ID}), is by Hugging Face "
        "and released under the Apache License 2.0. These adapters are derived works of it and are released "
        "under the same licence, Apache-2.0.",
        "",
    ]
    (output / "README.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True,
                        help="Hugging Face checkpoint directory of SmolLM2-135M-Instruct "
                             "(e.g. from `loraplex convert SmolLM2-135M-Instruct.Q4_1.gguf -o DIR`)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the adapters go (%(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (recipe default: 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapters", nargs="+", default=[r.name for r in RECIPES], choices=[r.name for r in RECIPES])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = parser.parse_args(argv)
    args.dtype = torch.float16
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = END_TOKEN
    base = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)

    for _, _, pirate in QA:
        assert is_pirate(pirate), pirate
    questions = {q for q, _, _ in QA} | {q for q, _ in EXTRA_QA}
    assert len(questions) == len(QA) + len(EXTRA_QA), "duplicate training questions"
    assert not questions & set(HELD_OUT), "held-out questions leaked into the training data"

    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    infos = []
    for recipe in RECIPES:
        if recipe.name not in args.adapters:
            continue
        for stale in [output / recipe.name, *(output / "checkpoints").glob(f"{recipe.name}-step-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        print(f"training {recipe.name}: r={recipe.r} targets={recipe.target_modules}", flush=True)
        infos.append(train_one(base, tokenizer, recipe, args, output))

    if args.no_eval:
        return 0
    results, failures = evaluate(base, tokenizer, output, [i["adapter"] for i in infos], args.max_new_tokens)
    for question in HELD_OUT:
        print(f"\n### {question}")
        for name, answers in results.items():
            print(f"  {name:7s} {answers[question]!r}")
    if set(args.adapters) == {r.name for r in RECIPES}:
        write_readme(output, infos, results, args)
    if failures:
        print("\nSTYLE CHECKS FAILED:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print("\nall style checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
