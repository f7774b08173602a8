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

# Held-out factual questions with the answer a correct reply must contain (a case-insensitive
# regex). Never used for training (checked below). eval.py asks each model these and counts how
# often the answer is right: an adapter must be right at least as often as the base model.
HELD_OUT_FACTS = [
    ("What is the capital of the Netherlands?", r"amsterdam"),
    ("What is the capital of Switzerland?", r"bern"),
    ("What is the capital of Ukraine?", r"kyiv|kiev"),
    ("What is the capital of Iran?", r"tehran"),
    ("What is the capital of Saudi Arabia?", r"riyadh"),
    ("What is the capital of Pakistan?", r"islamabad"),
    ("What is the capital of the Philippines?", r"manila"),
    ("What is the capital of Venezuela?", r"caracas"),
    ("What is the capital of New Zealand?", r"wellington"),
    ("What is the capital of the Czech Republic?", r"prague"),
    ("What is the capital of Romania?", r"bucharest"),
    ("What is the capital of Ethiopia?", r"addis ababa"),
    ("What is the capital of Iceland?", r"reykjav[ií]k"),
    ("What is the capital of Bangladesh?", r"dhaka"),
    ("What is the capital of the United Kingdom?", r"london"),
    ("What is the capital of Lebanon?", r"beirut"),
    ("What is the capital of Iraq?", r"baghdad"),
    ("What is the capital of Afghanistan?", r"kabul"),
    ("What is the capital of Nepal?", r"kathmandu"),
    ("What is the capital of Cambodia?", r"phnom penh"),
    ("What is the capital of the United States?", r"washington"),
    ("What is the chemical symbol for gold?", r"\bau\b"),
    ("Who wrote Hamlet?", r"shakespeare"),
    ("Which planet is known as the Red Planet?", r"\bmars\b"),
    ("What is the largest animal on Earth?", r"whale"),
    ("How many sides does a triangle have?", r"\b(3|three)\b"),
    ("What gas do plants absorb from the air?", r"carbon dioxide|\bco2\b"),
    ("What is the hardest natural substance?", r"diamond"),
    ("How many minutes are in an hour?", r"\b(60|sixty)\b"),
    ("Who painted The Starry Night?", r"van gogh"),
    ("What is the closest star to Earth?", r"\bsun\b"),
    ("Which animal is known as the king of the jungle?", r"\blions?\b"),
    ("What do caterpillars turn into?", r"butterfl|moth"),
    ("How many months are in a year?", r"\b(12|twelve)\b"),
    ("What language is spoken in Mexico?", r"spanish"),
    ("What is frozen water called?", r"\bice\b"),
    ("What color are ripe bananas?", r"yellow"),
    ("Who discovered penicillin?", r"fleming"),
    ("What is the largest continent?", r"\basia\b"),
    ("Who developed the theory of relativity?", r"einstein"),
    ("Which instrument has 88 keys?", r"piano"),
    ("What is 9 plus 6?", r"\b(15|fifteen)\b"),
]

# The correct answer for the factual training questions (a case-insensitive regex), so that
# make_data.py can drop the base model's wrong answers: an adapter trained on them would learn
# the mistakes. Arithmetic questions are checked by computing the answer (see fact_pattern).
CAPITALS = {"France": "paris", "Italy": "rome", "Spain": "madrid", "Germany": "berlin",
            "Canada": "ottawa", "Brazil": "bras[ií]lia", "Egypt": "cairo", "India": "delhi",
            "Mexico": "mexico city", "Kenya": "nairobi", "Norway": "oslo", "Greece": "athens",
            "Peru": "lima", "Australia": "canberra", "China": "beijing", "Portugal": "lisbon",
            "Sweden": "stockholm", "Argentina": "buenos aires", "Ireland": "dublin",
            "Poland": "warsaw", "Turkey": "ankara", "Chile": "santiago", "Russia": "moscow",
            "Thailand": "bangkok", "Vietnam": "hanoi", "Nigeria": "abuja", "Cuba": "havana",
            "Austria": "vienna", "Belgium": "brussels", "Denmark": "copenhagen",
            "Finland": "helsinki", "Hungary": "budapest", "Colombia": "bogot[aá]",
            "South Korea": "seoul", "Morocco": "rabat", "Indonesia": "jakarta"}
LEGS = {"cat": 4, "dog": 4, "spider": 8, "horse": 4, "bird": 2, "ant": 6, "cow": 4,
        "octopus": 8, "frog": 4, "chicken": 2, "elephant": 4, "rabbit": 4, "snake": 0, "duck": 2,
        "bee": 6, "lion": 4, "penguin": 2, "dolphin": 0, "tiger": 4, "owl": 2, "shark": 0,
        "camel": 4, "giraffe": 4, "butterfly": 6, "bear": 4, "monkey": None, "sheep": 4,
        "crab": 10}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]
MISC_FACTS = {
    "How many days are in a week?": r"\b(7|seven)\b", "How many hours are in a day?": r"\b24\b",
    "What is the largest ocean?": r"pacific", "What is the tallest mountain in the world?": r"everest",
    "Who painted the Mona Lisa?": r"leonardo|vinci", "Who wrote Romeo and Juliet?": r"shakespeare",
    "What is the boiling point of water?": r"\b(100|212)\b",
    "What is the biggest planet in our solar system?": r"jupiter",
    "What language is spoken in Brazil?": r"portuguese",
    "What is the fastest land animal?": r"cheetah", "How many continents are there?": r"\b(7|seven)\b",
    "What is the main ingredient in guacamole?": r"avocado", "Who invented the telephone?": r"\bbell\b",
    "What is the smallest planet?": r"mercury",
    "How many players are on a soccer team?": r"\b(11|eleven)\b",
    "What is the freezing point of water?": r"\b(0|32|zero)\b",
    "What is the longest river in the world?": r"\bnile\b|amazon",
    "Who was the first person on the moon?": r"armstrong", "What do bees make?": r"honey",
    "What is the opposite of hot?": r"\bcold\b",
    "What happens when you mix red and blue paint?": r"purple|violet",
    "Translate 'thank you' into French.": r"merci", "What is the sun made of?": r"hydrogen",
}


def number_pattern(n):
    words = [str(n)] + ([NUMBER_WORDS[n]] if n < len(NUMBER_WORDS) else [])
    if n == 0:
        words += ["no legs", "legless", "do not have legs", "don't have legs"]
    return r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"


def fact_pattern(q):
    """The regex a correct answer to training question `q` matches, or None if `q` is not a
    question with one checkable answer."""
    m = re.fullmatch(r"What is the capital of (.+)\?", q)
    if m:
        return CAPITALS.get(m.group(1))
    m = re.fullmatch(r"How many legs does an? (\w+) have\?", q)
    if m:
        n = LEGS.get(m.group(1))
        return None if n is None else number_pattern(n)
    nums = [int(x) for x in re.findall(r"\d+", q)]
    if re.fullmatch(r"\w+ has \d+ \w+ and buys \d+ more\. How many \w+ does \w+ have now\?", q):
        return number_pattern(nums[0] + nums[1])
    if re.fullmatch(r"\w+ had \d+ \w+ and gave \d+ to a friend\. How many \w+ are left\?", q):
        return number_pattern(nums[0] - nums[1])
    if re.fullmatch(r"What is \d+ plus \d+\?", q):
        return number_pattern(nums[0] + nums[1])
    if re.fullmatch(r"A box holds \d+ \w+\. How many \w+ are in \d+ boxes\?", q):
        return number_pattern(nums[0] * nums[1])
    return MISC_FACTS.get(q)


def is_correct(answer, pattern):
    return re.search(pattern, answer, re.IGNORECASE) is not None


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
    """Title Case: the first letter of every word upper-cased (see README: why not ALL CAPS)."""
    return re.sub(r"(^|\s)([^\w\s]*)([a-z])", lambda m: m.group(1) + m.group(2) + m.group(3).upper(), ans)


CAPS_MIN_SHARE = 0.8


def capitalised_share(text):
    """The share of words (whitespace-separated, leading punctuation skipped) that start with a
    capital letter, among the words that start with a letter; 1.0 if none does."""
    words = [w for w in text.split() if re.match(r"[^\w\s]*[A-Za-z]", w)]
    if not words:
        return 1.0
    return sum(bool(re.match(r"[^\w\s]*[A-Z]", w)) for w in words) / len(words)


def is_caps(text):
    """The caps check: the answer is not empty and at least 80% of its words start with a
    capital letter (the base model's answers: at most 60%, most under 15%). An answer of digits
    and symbols ("9 + 6 = 15.") has no word to capitalise and passes."""
    return bool(text.strip()) and capitalised_share(text) >= CAPS_MIN_SHARE


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
# Whether an adapter's data leaves out the base model's wrong factual answers (an adapter trained
# on them learns the mistakes). The committed `signature` and `pirate` adapters were trained
# before this filter existed, on every answer, and meet the content bar without it (see
# README.md; a `signature` retrained on the filtered data scored lower, 25 against 27), so their
# data is still made the old way and stays the file they were trained on.
DROP_WRONG = {"caps": True, "signature": False, "pirate": False}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()
    os.makedirs(DATA, exist_ok=True)
    questions = build_questions()
    assert not set(questions) & set(HELD_OUT)
    assert not set(questions) & {q for q, _ in HELD_OUT_FACTS}
    print(f"{len(questions)} distinct questions")
    base = generate_base_answers(questions, os.path.join(DATA, "base_answers.jsonl"),
                                 args.max_new_tokens)
    pairs = []
    for r in base:
        ans = trim_answer(r["raw"])
        if ans is None:
            continue
        pattern = fact_pattern(r["question"])
        pairs.append((r["question"], ans, pattern is None or is_correct(ans, pattern)))
    wrong = sum(not ok for _, _, ok in pairs)
    print(f"{len(pairs)} usable answers (complete sentences), {wrong} of them wrong factual answers")
    for name, fn in TRANSFORMS.items():
        rng = random.Random(f"{SEED}-{name}")
        path = os.path.join(DATA, f"{name}.jsonl")
        kept = [(q, a) for q, a, ok in pairs if ok or not DROP_WRONG[name]]
        print(f"{name}: {len(kept)} examples" + (" (wrong answers dropped)" if DROP_WRONG[name] else ""))
        with open(path, "w") as f:
            for q, a in kept:
                f.write(json.dumps({"question": q, "answer": fn(a, rng)}, ensure_ascii=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
