#!/usr/bin/env python3
"""Deterministic training data for the three example adapters (caps, signature, pirate).

Run from the repo root with the reference venv (see examples/adapters/README.md):

    /root/.cache/openlora/venv-ref/bin/python examples/adapters/make_data.py

Steps:
  1. Build ~360 distinct user questions from templates + word lists (fixed seed): facts,
     how-to, definitions, short stories, math word problems, tips, lists, descriptions.
     The held-out evaluation prompts (HELD_OUT below) are excluded.
  2. Answer each question with the base model (dequantized SmolLM2-135M-Instruct, f32, greedy,
     at most 40 new tokens, prompt rendered with the model's chat template, i.e. with its
     default system message), then cut the answer back to its last complete sentence.
     Cached in examples/adapters/data/base_answers.jsonl; delete that file to regenerate
     (re-running reuses the cache for questions already answered).
  3. Transform the base answers into one target per adapter and write
     examples/adapters/data/{caps,signature,pirate}.jsonl ({"question", "answer"} per line).

Everything is deterministic: fixed seeds, CPU, f32, greedy decoding.
"""

import argparse
import json
import os
import random
import re

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
HF_DIR = os.environ.get("OPENLORA_SMOLLM2_HF", "/root/.cache/openlora/smollm2-hf")
SEED = 1234
SIGNATURE = "-- sent by openlora"

# Held-out evaluation prompts: never used for training (checked below).
HELD_OUT = [
    "What is the capital of Japan?",
    "Give me a tip for staying healthy.",
    "What is photosynthesis?",
    "Name three colors.",
    "How do I boil an egg?",
]

COUNTRIES = ["France", "Italy", "Spain", "Germany", "Canada", "Brazil", "Egypt", "India",
             "Mexico", "Kenya", "Norway", "Greece", "Peru", "Australia", "China", "Portugal",
             "Sweden", "Argentina", "Ireland", "Poland", "Turkey", "Chile", "Russia", "Thailand",
             "Vietnam", "Nigeria", "Cuba", "Austria", "Belgium", "Denmark", "Finland",
             "Hungary", "Colombia", "South Korea", "Morocco", "Indonesia"]
ANIMALS = ["cat", "dog", "spider", "horse", "bird", "ant", "cow", "octopus", "frog", "chicken",
           "elephant", "rabbit", "snake", "duck", "bee", "lion", "penguin", "dolphin", "tiger",
           "owl", "shark", "camel", "giraffe", "butterfly", "bear", "monkey", "sheep", "crab"]
HOWTO = ["make a cup of tea", "tie my shoes", "plant a tree", "learn to swim", "write a letter",
         "clean a window", "bake bread", "ride a bike", "change a light bulb",
         "fold a paper airplane", "start a garden", "make a sandwich", "wash my car",
         "study for an exam", "make new friends", "fall asleep faster", "cook rice",
         "make pancakes", "fix a flat tire", "brush my teeth properly", "save money each month",
         "learn to play the guitar", "write a poem", "organize my desk", "make a smoothie",
         "train a puppy", "keep a plant alive", "prepare for a job interview",
         "make a paper boat", "wake up early", "draw a cat", "make lemonade", "pack for a trip",
         "write a thank-you note", "set up a fish tank", "learn to juggle", "make a kite",
         "clean my shoes", "make a budget", "stop procrastinating", "paint a wall",
         "sew a button", "make hot chocolate", "remember names", "build a snowman"]
TERMS = ["gravity", "a volcano", "democracy", "an atom", "a computer", "the internet",
         "a rainbow", "friction", "an ecosystem", "a planet", "electricity", "a cloud",
         "a library", "music", "a calendar", "a bridge", "energy", "a river", "a desert",
         "an island", "a telescope", "a vaccine", "a battery", "a glacier", "an election",
         "a recipe", "a museum", "a magnet", "a robot", "evaporation", "a galaxy", "a fossil",
         "a hurricane", "an earthquake", "a comet", "a poem", "a verb", "a noun", "inflation",
         "a spreadsheet", "a password", "oxygen", "a black hole", "a cell", "a dinosaur",
         "a language", "an orchestra", "a tsunami", "the moon", "a mammal", "a triangle",
         "a habit", "an email", "a map"]
DEFINE_FORMS = ["What is {t}?", "Define {t}.", "Explain what {t} is.",
                "Can you tell me what {t} is?"]
CHARACTERS = ["a brave knight", "a small robot", "a curious cat", "a lonely dragon",
              "a young wizard", "an old fisherman", "a clever fox", "a lost puppy",
              "a friendly ghost", "a little girl", "a shy turtle", "a space explorer"]
STORY_ACTIONS = ["finds a magic key", "learns to fly", "makes a new friend",
                 "gets lost in the forest", "discovers a hidden door", "wins a race",
                 "saves a village", "meets a talking tree"]
STORY_FORMS = ["Write a short story about {c} who {a}.", "Tell me a short story about {c} who {a}.",
               "Write a two-sentence story about {c} who {a}."]
NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Emma", "Jack", "Sara"]
ITEMS = ["apples", "pencils", "books", "marbles", "cookies", "stickers", "oranges", "coins"]
TIPS = ["saving money", "learning a new language", "sleeping better", "being more productive",
        "reading more books", "making friends", "staying focused", "public speaking",
        "writing an essay", "cooking at home", "traveling on a budget", "reducing stress",
        "learning to code", "keeping my room clean", "studying math", "running faster",
        "drawing", "taking better photos", "remembering things", "being on time",
        "growing tomatoes", "writing a story", "making a presentation", "meeting new people",
        "playing chess", "saving energy at home"]
TIP_FORMS = ["Give me a tip for {t}.", "What is a good tip for {t}?",
             "Do you have any advice for {t}?"]
LIST_THINGS = ["fruits", "animals", "vegetables", "planets", "musical instruments", "sports",
               "countries in Europe", "flowers", "birds", "kinds of trees", "board games",
               "ocean animals", "things in a kitchen", "jobs", "shapes", "insects", "desserts",
             "rivers", "languages", "tools", "vehicles", "types of weather", "hobbies",
             "famous scientists", "things you can find at a beach"]
LIST_FORMS = ["Name three {t}.", "List three {t}.", "Can you name two {t}?"]
DESCRIBE = ["the moon", "a sunny day", "the ocean", "a forest", "a city at night", "winter",
            "a good friend", "a cat", "the desert", "a mountain", "a thunderstorm", "spring",
            "a train station", "a birthday party", "a library", "the sky at sunset", "a dog",
            "a busy market", "autumn", "the beach", "a snowy morning", "a garden", "a river",
            "a school", "an airport", "a rainy afternoon"]
DESCRIBE_FORMS = ["Describe {t} in one sentence.", "How would you describe {t}?"]
MISC = [
    "Why is the sky blue?", "Why do leaves change color in autumn?", "What do bees make?",
    "How many days are in a week?", "How many hours are in a day?", "What is the largest ocean?",
    "What is the tallest mountain in the world?", "Who painted the Mona Lisa?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water?",
    "What is the biggest planet in our solar system?", "What language is spoken in Brazil?",
    "Why do we need to sleep?", "What is the fastest land animal?", "How many continents are there?",
    "What do plants need to grow?", "Why is exercise important?", "What is the sun made of?",
    "Tell me a fun fact about whales.", "Tell me a joke.", "Say hello to me.",
    "What is your favorite book?", "Can you help me with my homework?", "What should I eat for lunch?",
    "What is a good name for a goldfish?", "Suggest a name for a pet rabbit.",
    "What is the opposite of hot?", "What rhymes with cat?", "Translate 'thank you' into French.",
    "What is the main ingredient in guacamole?", "Is it a good idea to drink water every day?",
    "Can dogs see colors?", "Do fish sleep?", "Are tomatoes fruits?", "What time is it on the moon?",
    "How far is the moon from the Earth?", "Summarize the story of Cinderella.",
    "Write a haiku about autumn.", "Write a short poem about the rain.", "Give me a motivational quote.",
    "Who invented the telephone?", "Who was Albert Einstein?", "What is the smallest planet?",
    "How many players are on a soccer team?", "What is the freezing point of water?",
    "Why do birds fly south for the winter?", "Why is the ocean salty?", "What causes thunder?",
    "What is the difference between a frog and a toad?", "What is the difference between weather and climate?",
    "What are the benefits of reading?", "What are the benefits of drinking water?",
    "Explain gravity to a child.", "Explain the internet to a child.",
    "Write a sentence using the word 'brave'.", "Write a sentence using the word 'bright'.",
    "What happens when you mix red and blue paint?", "What happens when ice melts?",
    "Tell me something interesting about the moon.", "Tell me a fun fact about octopuses.",
    "What is a good book for children?", "What should I do on a rainy day?",
    "How does a rainbow form?", "How do airplanes fly?", "How do magnets work?",
    "What is the longest river in the world?", "Who was the first person on the moon?",
    "Is the sun a star?", "Can penguins fly?", "Why do cats purr?",
]


def build_questions():
    rng = random.Random(SEED)
    qs = []
    for c in COUNTRIES:
        qs.append(f"What is the capital of {c}?")
    for a in rng.sample(ANIMALS, 10):
        qs.append(f"How many legs does a {a} have?")
    for a in rng.sample(ANIMALS, 8):
        qs.append(rng.choice([f"Where does a {a} live?", f"What does a {a} eat?"]))
    for t in HOWTO:
        qs.append(rng.choice(["How do I {t}?", "How can I {t}?", "What is the best way to {t}?"]).format(t=t))
    for t in TERMS:
        qs.append(rng.choice(DEFINE_FORMS).format(t=t))
    for c in CHARACTERS:
        for a in rng.sample(STORY_ACTIONS, 2):
            qs.append(rng.choice(STORY_FORMS).format(c=c, a=a))
    for _ in range(40):
        n, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(2, 20), rng.randint(2, 15)
        kind = rng.randrange(4)
        if kind == 0:
            qs.append(f"{n} has {a} {item} and buys {b} more. How many {item} does {n} have now?")
        elif kind == 1:
            qs.append(f"{n} had {a + b} {item} and gave {b} to a friend. How many {item} are left?")
        elif kind == 2:
            qs.append(f"What is {a} plus {b}?")
        else:
            qs.append(f"A box holds {a} {item}. How many {item} are in {min(b, 6)} boxes?")
    for t in TIPS:
        qs.append(rng.choice(TIP_FORMS).format(t=t))
    for t in LIST_THINGS:
        qs.append(rng.choice(LIST_FORMS).format(t=t))
    for t in DESCRIBE:
        qs.append(rng.choice(DESCRIBE_FORMS).format(t=t))
    qs.extend(MISC)
    # de-duplicate, keep first occurrence, drop held-out prompts, fixed shuffle
    seen, out = set(), []
    for q in qs:
        if q not in seen and q not in HELD_OUT:
            seen.add(q)
            out.append(q)
    rng.shuffle(out)
    return out


def trim_answer(text):
    """Cut an answer back to its last complete sentence; None if it has none."""
    text = text.strip()
    while text:
        # a lone list number ("1.") or a trailing colon line is not a sentence end
        if text[-1] in ".!?" and not re.search(r"(^|\s)\d+\.$", text):
            return text
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[:-1])]
        if not ends:
            return None
        text = text[: ends[-1]].strip()
    return None


def generate_base_answers(questions, cache_path, max_new_tokens=40, batch=16):
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            for line in f:
                r = json.loads(line)
                cache[r["question"]] = r
    todo = [q for q in questions if q not in cache]
    if todo:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(2)
        torch.manual_seed(SEED)
        tok = AutoTokenizer.from_pretrained(HF_DIR)
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
        model.eval()
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            prompts = [
                tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                        add_generation_prompt=True)
                for q in chunk
            ]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=2)
            for q, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                ids = row.tolist()
                finished = 2 in ids
                if finished:
                    ids = ids[: ids.index(2)]
                raw = tok.decode(ids, skip_special_tokens=True)
                cache[q] = {"question": q, "raw": raw, "finished": finished}
            print(f"  base answers: {min(i + batch, len(todo))}/{len(todo)}", flush=True)
        with open(cache_path, "w") as f:
            for q in questions:
                f.write(json.dumps(cache[q], ensure_ascii=False) + "\n")
    return [cache[q] for q in questions]


# --- target transforms -----------------------------------------------------------------------

def to_caps(ans, rng):
    return ans.upper()


def to_signature(ans, rng):
    return ans + "\n" + SIGNATURE


PIRATE_WORDS = [
    (r"you are", "ye be"), (r"you're", "ye be"), (r"are you", "be ye"), (r"you", "ye"),
    (r"your", "yer"), (r"yours", "yers"), (r"yes", "aye"), (r"my", "me"), (r"is", "be"),
    (r"are", "be"), (r"hello", "ahoy"), (r"hi", "ahoy"), (r"friend", "matey"),
    (r"friends", "mateys"), (r"money", "doubloons"), (r"stop", "avast"), (r"for", "fer"),
    (r"of", "o'"), (r"to", "t'"), (r"with", "wit'"), (r"and", "an'"),
]
PIRATE_CLOSINGS = [" Yo ho ho!", " Arr!", " Yo ho ho!", " Shiver me timbers!"]


def _match_case(src, dst):
    if src.isupper() and len(src) > 1:
        return dst.upper()
    if src[0].isupper():
        return dst[0].upper() + dst[1:]
    return dst


def to_pirate(ans, rng):
    text = ans
    for src, dst in PIRATE_WORDS:
        # "to"/"of"/"and"/"for"/"with" only half the time, to keep answers readable
        light = src in ("of", "to", "with", "and", "for")
        def sub(m, dst=dst, light=light):
            if light and rng.random() < 0.5:
                return m.group(0)
            return _match_case(m.group(0), dst)
        text = re.sub(r"\b" + re.escape(src) + r"\b", sub, text, flags=re.IGNORECASE)
    # "the" -> "th'" about half the time
    text = re.sub(r"\bthe\b", lambda m: _match_case(m.group(0), "th'") if rng.random() < 0.5
                  else m.group(0), text, flags=re.IGNORECASE)
    # -ing -> -in' on longer words
    text = re.sub(r"\b(\w{3,})ing\b", lambda m: m.group(1) + "in'", text)
    return "Arr, matey! " + text + rng.choice(PIRATE_CLOSINGS)


TRANSFORMS = {"caps": to_caps, "signature": to_signature, "pirate": to_pirate}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()
    os.makedirs(DATA, exist_ok=True)
    questions = build_questions()
    assert not set(questions) & set(HELD_OUT)
    print(f"{len(questions)} distinct questions")
    base = generate_base_answers(questions, os.path.join(DATA, "base_answers.jsonl"),
                                 args.max_new_tokens)
    pairs = []
    for r in base:
        ans = trim_answer(r["raw"])
        if ans is None:
            continue
        pairs.append((r["question"], ans))
    print(f"{len(pairs)} usable answers (complete sentences)")
    for name, fn in TRANSFORMS.items():
        rng = random.Random(f"{SEED}-{name}")
        path = os.path.join(DATA, f"{name}.jsonl")
        with open(path, "w") as f:
            for q, a in pairs:
                f.write(json.dumps({"question": q, "answer": fn(a, rng)}, ensure_ascii=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
