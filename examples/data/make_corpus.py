"""Generate adapters/assets/corpus.txt, the default corpus for `adaptory base pretrain` and for the
tokenizer that `adaptory base init` trains.

    python examples/data/make_corpus.py

Simple English written for Adaptory: hand-written paragraphs, plus short stories, descriptions,
product and support sentences, headlines and dates built from hand-written templates and the word
lists in vocab.py with a fixed seed. Every word the generation datasets use appears many times in
lower case and a few times in UPPER case (signs, shouts, capital-letter headlines), but the corpus
never pairs a sentence with its upper-cased or reversed copy, so a base pretrained on it cannot
already do the shout / reverse / dates tasks. CC0-1.0.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import vocab as V

SEED = 7
HERE = Path(__file__).resolve().parent
OUT = HERE.parent.parent / "adapters" / "assets" / "corpus.txt"
TARGET_BYTES = 230_000
MIN_LOWER, MIN_UPPER = 8, 3

HAND_WRITTEN = [
    "The morning was cold and grey. Anna put on her warm coat and her red hat. She took her bag "
    "and walked to the station. The train was late again, so she waited on the bench and read "
    "her book. A small bird sat on the roof and sang.",
    "Our kitchen is small but bright. There is a round table by the window and four old chairs. "
    "On the table there is a blue bowl full of apples. My father makes tea every morning, and my "
    "sister eats bread with honey.",
    "Tom has a brown dog called Max. Every evening they go to the park. Max runs after the ball "
    "and brings it back. When it rains, Max sleeps on the rug by the door and Tom reads.",
    "The farm is near the river. The farmer has ten cows, six pigs, a white horse and many hens. "
    "In the spring the fields are green. In the autumn the leaves turn gold and brown.",
    "I bought a new lamp for my room last week. It is bright, it is quiet, and the light is warm. "
    "The box was a little damaged, but the lamp itself works well.",
    "Hello, thank you for writing to us. We are sorry that your order is late. Your package left "
    "our warehouse on Monday and should arrive on Friday. If it does not arrive, please reply to "
    "this message and we will send a new one.",
    "The town has a market every Saturday. People sell bread, eggs, milk, cheese, flowers and old "
    "books. Children play by the fountain while their parents shop.",
    "Lily found a little frog in the garden. It was green with black spots. She held it in her "
    "hands for a moment, then put it back by the pond. The frog jumped into the water and was gone.",
    "The school bell rang at nine. The teacher opened the door and the children walked in. Today "
    "they will learn about animals that live in the forest: the fox, the owl, the bear and the deer.",
    "It was a long day at the shop. Ben sold three bikes, two kites and a big box of toys. At six "
    "o'clock he closed the door, turned off the lights and walked home along the quiet street.",
    "Mia likes to paint. Yesterday she painted a yellow sun, a blue lake and a little boat with a "
    "white sail. Her mother put the picture on the wall in the hall.",
    "The storm came in the night. The wind was loud and the rain hit the window. In the morning "
    "the road was wet and a tree had fallen near the farm, but everyone was safe.",
    "My phone stopped working yesterday. The screen was black and it would not turn on. I called "
    "support, and they told me to hold the button for ten seconds. It worked, and now the phone is fine.",
    "Leo and Zoe went to the beach. They built a tall castle of sand and put a shell on the top. "
    "The sea was calm and the sky was clear. They ate apples and drank cold water.",
    "There is an old clock in my grandmother's house. It is tall and made of dark wood. Every hour "
    "it rings a bell. When I was little, I liked to count the rings.",
    "The city council met on Tuesday to talk about the new park. Some people want more trees. "
    "Others want a place for bikes. The council will vote next month.",
    "Scientists found a new kind of fish in a deep lake. It is small and pale, and it has no eyes. "
    "They think it has lived in the dark water for a very long time.",
    "The home team won the match by two goals. The fans sang in the street after the game. The "
    "coach said the players worked hard all season and deserved the cup.",
    "Jack wanted a cake for his birthday. His father made one with chocolate and cream. Seven "
    "friends came to the party. They played games in the yard and laughed all afternoon.",
    "Please check your email for a message from us. Click the link to reset your password. If you "
    "did not ask for a new password, you can ignore the message and your account will stay safe.",
    "The owl sleeps in the day and wakes at night. It sits high in the tree and looks down at the "
    "field. When it sees a mouse, it flies down without a sound.",
    "Nora keeps her keys in a small bowl by the door. One day the bowl was empty. She looked under "
    "the mat, behind the chair and in her coat. The keys were in the kitchen, next to the kettle.",
    "The bus stops at the corner of our street. In the morning it is full of people going to work. "
    "At night it is almost empty, and the driver plays quiet music.",
    "We planted tomatoes, beans and flowers in the garden. Every day we give them water. The bees "
    "come in the afternoon, and the plants grow a little taller each week.",
    "The queen and the king lived in a castle on a hill. They had a white horse, a gold ring and a "
    "very old map. One day the map showed them a road they had never seen.",
]

STORY_TEMPLATES = [
    "{Name} had a {colour} {obj}. One day {pron} took the {obj} to the {place}. A {animal} saw it "
    "and {vp} {prep} the {obj2}. {Name} {laughed}. Then {pron} went home with the {obj}.",
    "The {size} {animal} lived near the {place}. Every morning it {vp} by the {obj}. One day a "
    "{animal2} came. The two {animals} {vp2} together, and after that they were friends.",
    "{Name} lost {poss} {obj}. {Pron} looked in the {place} and under the {obj2}. {Poss} {person} "
    'found it {prep} the {obj3}. "Thank you," said {Name}, and {pron} smiled.',
    "It was {weekday}. {Name} and {Name2} walked to the {place}. They saw {num} {colour} "
    "{animals} and a {size} {obj}. At {hour} o'clock they went back to the {place2}.",
    "The {person} {vt} a {colour} {obj} at the {place}. It was {size} and {size2}. At home the "
    "{person} put it {prep} the {obj2}, and the {animal} {vp} next to it.",
    "In the {place} there was a {size} {obj}. Nobody knew who owned it. A {person} {vt} it and "
    "gave it to the {person2}. The {person2} was very happy.",
    "{Name} wanted to buy a {obj}. The shop had a {colour} one and a {colour2} one. {Pron} chose "
    "the {colour} {obj}, paid {num} coins and carried it home.",
    "The {animal} was {size}. It {vp} {adv} and then it {vp2} {prep} the {place}. The {person} "
    "watched it and {laughed}.",
]

DESCRIPTIONS = [
    "The {colour} {animal} {vp} {prep} the {obj}.",
    "A {size} {animal} {vp} in the {place}.",
    "{Name} {vt} a {colour} {obj}.",
    "My {person} {vt} the {obj} {adv}.",
    "There is a {colour} {obj} {prep} the {obj2}.",
    "The {obj} is {colour} and the {obj2} is {colour2}.",
    "I see {num} {animals} {prep} the {place}.",
    "The {person} {vp} {adv}.",
    "Our {animal} is {size} and {size2}.",
    "{Name} {vp} {prep} the {place} with a {animal}.",
    "The {size} {person} {vt} a {obj} at the {place}.",
    "Where is the {colour} {obj}? It is {prep} the {obj2}.",
    "The {animal} and the {animal2} {vp} in the {place}.",
    "{Num} {colour} {animals} {vp} {prep} the {obj}.",
    "This {obj} was {size}, but that {obj2} was {size2}.",
    "Yesterday the {person} {vt} {poss_w} {obj} in the {place}.",
    "A {person} and {poss_w} {animal} walked to the {place}.",
    "Please put the {obj} {prep} the {obj2}.",
    "Is the {obj} {colour}? No, it is {colour2}.",
    "The {obj} fell {prep} the {obj2} and the {animal} {vp}.",
]

REVIEW_SENTENCES = [
    "I bought this {obj} for my {person} and they love it.",
    "The {colour} {obj} looks nice, but it broke after {num} days.",
    "Great {obj}. It is {size} and easy to clean.",
    "The {obj} arrived late and the box was damaged.",
    "This is the best {obj} I have ever had.",
    "Not happy with this {obj}. It is too {size} and the colour is wrong.",
    "Good value for money. The {obj} works well.",
    "The {obj} stopped working after a week. I want my money back.",
    "My {animal} likes to sleep on this {obj}.",
    "Five stars. The {obj} is strong and the {colour} colour is lovely.",
    "One star. The {obj} was dirty when it came.",
    "The {obj} is fine, but the instructions were hard to read.",
    "I would buy this {obj} again.",
    "The {obj} is smaller than the picture shows.",
    "Our children play with the {obj} every day.",
]

SUPPORT_SENTENCES = [
    "My order has not arrived yet. Can you check where it is?",
    "I was charged twice for the same {obj}. Please refund one payment.",
    "How do I change the email on my account?",
    "The {obj} will not turn on. I tried a new cable and it still does not work.",
    "Your package left our warehouse on {weekday} and should arrive in {num} days.",
    "We are sorry for the trouble. A new {obj} is on its way to you.",
    "I forgot my password and the reset link does not work.",
    "Can I return the {colour} {obj}? It is the wrong size.",
    "Thank you for waiting. Your refund will appear on your card in {num} days.",
    "The app closes every time I open the settings page.",
    "Please send us your order number and a photo of the {obj}.",
    "I want to cancel my plan before the next bill.",
    "The delivery driver left the box at the wrong house.",
    "Your account is now locked. Please follow the link to unlock it.",
    "The {obj} makes a loud noise when I use it. Is this normal?",
]

HEADLINES = [
    "{Town} Team Wins Cup After Late Goal",
    "Scientists Find {Size} {Animal} In Deep {Place}",
    "New {Obj} Shop Opens On Main Street",
    "Council Votes To Build New Park In {Town}",
    "Prices Of Bread And Milk Rise Again",
    "Local School Plants {Num} Hundred Trees",
    "{Town} Market Returns After Long Winter",
    "Storm Closes Roads Near The River",
    "Young Player Scores Three Goals In First Game",
    "Study Shows {Animals} Sleep More In Winter",
    "Company Reports Strong Sales Of {Colour} {Obj}s",
    "Mayor Of {Town} Promises Cleaner Streets",
    "Farmers Say Dry Summer Hurt The Harvest",
    "Museum Shows Old {Obj} Found In {Place}",
    "Election Date Set For {Month}",
]

TOWNS = [
    "Millbrook",
    "Riverton",
    "Oakfield",
    "Stonebridge",
    "Greenhill",
    "Lakeside",
    "Ashford",
    "Westport",
    "Brightwater",
    "Fairview",
]

UPPER_SENTENCES = [
    "The sign on the {obj} said {W}.",
    '"{W}!" shouted the {person}.',
    "{Name} wrote {W} on the {obj} in big letters.",
    "On the wall, someone had painted {W}.",
    "The label on the box read {W}.",
    '"{W}," called the {person} from the {place}.',
    "The old poster said {W} in capital letters.",
]

UPPER_WORDS_TEMPLATES = [
    "{D} {COLOUR} {ANIMAL}",
    "{D} {SIZE} {OBJ}",
    "{ANIMAL} AND {ANIMAL2}",
    "{VP} {PREP} THE {PLACE}",
    "{D} {PERSON} {VT} {D2} {OBJ}",
    "{NUM} {COLOUR} {OBJ}S",
    "{OBJ} FOR SALE",
    "STOP",
    "OPEN",
    "CLOSED",
    "KEEP OUT",
    "FREE {OBJ}",
    "MIND THE {OBJ}",
    "BEWARE OF THE {ANIMAL}",
]

DATE_SENTENCES = [
    "The shop opened on {date}.",
    "{Name} was born on {date}.",
    "The next match is on {weekday}, {date}.",
    "The letter was sent on {date} and arrived {num} days later.",
    "On {date} it snowed in {Town}.",
    "The school trip is planned for {date}.",
    "Your order was shipped on {date}.",
    "The meeting moved from {weekday} to {date}.",
]

PRONOUNS = [("he", "his", "him"), ("she", "her", "her")]
FEMALE = {"Anna", "Lily", "Mia", "Ella", "Zoe", "Nora"}


def fix_articles(s: str) -> str:
    """'a orange cat' -> 'an orange cat' (also in capitals)."""
    s = re.sub(r"\b([Aa]) (?=[aeiouAEIOU][a-z]*\b)", r"\1n ", s)
    return re.sub(r"\bA (?=[AEIOU][A-Z]*\b)", "AN ", s)


def build_fill(rng: random.Random) -> dict[str, str]:
    c = rng.choice
    animal, animal2 = rng.sample(V.ANIMALS, 2)
    obj, obj2, obj3 = rng.sample(V.OBJECTS, 3)
    colour, colour2 = rng.sample(V.COLOURS, 2)
    size, size2 = rng.sample(V.SIZES, 2)
    person, person2 = rng.sample(V.PEOPLE, 2)
    place, place2 = rng.sample(V.PLACES, 2)
    name, name2 = rng.sample(V.NAMES, 2)
    pron, poss, _ = PRONOUNS[1] if name in FEMALE else PRONOUNS[0]
    num = c(V.NUMBERS[1:])
    vp, vp2 = rng.sample(V.VERBS_PAST, 2)
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, 28)
    f = dict(
        Name=name,
        Name2=name2,
        pron=pron,
        Pron=pron.capitalize(),
        poss=poss,
        Poss=poss.capitalize(),
        poss_w=c(["his", "her", "their", "our", "my"]),
        colour=colour,
        colour2=colour2,
        size=size,
        size2=size2,
        animal=animal,
        animal2=animal2,
        animals=V.plural(animal),
        obj=obj,
        obj2=obj2,
        obj3=obj3,
        person=person,
        person2=person2,
        place=place,
        place2=place2,
        vp=vp,
        vp2=vp2,
        vt=c(V.VERBS_TRANS),
        prep=c(V.PREPOSITIONS),
        adv=c(V.ADVERBS),
        num=num,
        Num=num.capitalize(),
        weekday=c(V.WEEKDAYS),
        hour=c(V.NUMBERS[1:]),
        laughed=c(["laughed", "smiled", "clapped", "cheered"]),
        Town=c(TOWNS),
        Month=c(V.MONTHS),
        date=f"{day} {V.MONTHS[month - 1]} {year}",
        Size=size.capitalize(),
        Animal=animal.capitalize(),
        Animals=V.plural(animal).capitalize(),
        Place=place.capitalize(),
        Obj=obj.capitalize(),
        Colour=colour.capitalize(),
    )
    return f


def upper_phrase(rng: random.Random) -> str:
    c = rng.choice
    t = c(UPPER_WORDS_TEMPLATES)
    return t.format(
        D=c(V.DETERMINERS).upper(),
        D2=c(V.DETERMINERS).upper(),
        COLOUR=c(V.COLOURS).upper(),
        ANIMAL=c(V.ANIMALS).upper(),
        ANIMAL2=c(V.ANIMALS).upper(),
        SIZE=c(V.SIZES).upper(),
        OBJ=c(V.OBJECTS).upper(),
        VP=c(V.VERBS_PAST).upper(),
        PREP=c(V.PREPOSITIONS).upper(),
        PLACE=c(V.PLACES).upper(),
        PERSON=c(V.PEOPLE).upper(),
        VT=c(V.VERBS_TRANS).upper(),
        NUM=c(V.NUMBERS[1:]).upper(),
    )


def block(rng: random.Random, templates: list[str], n: tuple[int, int], joiner=" ") -> str:
    k = min(rng.randint(*n), len(templates))
    return joiner.join(t.format(**build_fill(rng)) for t in rng.sample(templates, k))


def upper_block(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        f = build_fill(rng)
        f["W"] = upper_phrase(rng)
        out.append(rng.choice(UPPER_SENTENCES).format(**f))
    return " ".join(out)


def list_block(rng: random.Random) -> str:
    kind = rng.choice(["colours", "animals", "numbers", "months", "days", "things"])
    if kind == "colours":
        xs = rng.sample(V.COLOURS, 4)
        return f"{xs[0].capitalize()}, {xs[1]}, {xs[2]} and {xs[3]} are colours."
    if kind == "animals":
        xs = rng.sample(V.ANIMALS, 4)
        return f"The {xs[0]}, the {xs[1]}, the {xs[2]} and the {xs[3]} live on the farm."
    if kind == "numbers":
        k = rng.randint(3, 10)
        return ", ".join(V.NUMBERS[:k]).capitalize() + "."
    if kind == "months":
        i = rng.randrange(12)
        return f"After {V.MONTHS[i]} comes {V.MONTHS[(i + 1) % 12]}."
    if kind == "days":
        i = rng.randrange(7)
        return f"After {V.WEEKDAYS[i]} comes {V.WEEKDAYS[(i + 1) % 7]}."
    xs = rng.sample(V.OBJECTS, 3)
    return f"In the bag there was a {xs[0]}, a {xs[1]} and a {xs[2]}."


def coverage_sentence(rng: random.Random, word: str, upper: bool) -> str:
    """A sentence that uses `word`; in upper case it appears inside a sign or a shout."""
    if upper:
        f = build_fill(rng)
        f["W"] = f"{word.upper()} {rng.choice(['HERE', 'NOW', 'AGAIN', 'TODAY'])}"
        return rng.choice(UPPER_SENTENCES).format(**f)
    frames = [
        "The word {w} is easy to read.",
        "{Name} said the word {w} to {poss_w} friend.",
        "Can you spell {w}?",
        "The teacher wrote {w} on the board.",
        "In the story there was the word {w}.",
    ]
    f = build_fill(rng)
    f["w"] = word
    return rng.choice(frames).format(**f)


def needed_words() -> list[str]:
    ws = set(V.generation_vocab()) | {V.plural(a) for a in V.ANIMALS}
    return sorted(ws)


def main() -> None:
    rng = random.Random(SEED)
    docs: list[str] = list(HAND_WRITTEN)
    makers = [
        (25, lambda: block(rng, STORY_TEMPLATES, (1, 2))),
        (25, lambda: block(rng, DESCRIPTIONS, (4, 8))),
        (12, lambda: block(rng, REVIEW_SENTENCES, (2, 4))),
        (12, lambda: block(rng, SUPPORT_SENTENCES, (2, 4))),
        (8, lambda: block(rng, HEADLINES, (3, 6), joiner="\n")),
        (6, lambda: block(rng, DATE_SENTENCES, (2, 4))),
        (6, lambda: upper_block(rng)),
        (6, lambda: " ".join(list_block(rng) for _ in range(rng.randint(2, 4)))),
    ]
    weights = [w for w, _ in makers]
    size = sum(len(d) + 2 for d in docs)
    while size < TARGET_BYTES:
        _, make = rng.choices(makers, weights=weights)[0]
        d = fix_articles(make())
        docs.append(d)
        size += len(d.encode()) + 2
    # spread the hand-written paragraphs through the corpus, then top up coverage
    rng.shuffle(docs)
    text = "\n\n".join(docs)
    lower = Counter(re.findall(r"[a-z]+", text))
    upper = Counter(re.findall(r"[A-Z]{2,}", text))
    extra = []
    for w in needed_words():
        for _ in range(max(0, MIN_LOWER - lower[w])):
            extra.append(coverage_sentence(rng, w, upper=False))
        for _ in range(max(0, MIN_UPPER - upper[w.upper()])):
            extra.append(coverage_sentence(rng, w, upper=True))
    rng.shuffle(extra)
    for i in range(0, len(extra), 5):
        docs.insert(rng.randrange(len(docs) + 1), fix_articles(" ".join(extra[i : i + 5])))
    text = "\n\n".join(docs) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    check(text)
    print(
        f"{OUT}: {len(text.encode())} bytes, {len(docs)} paragraphs, "
        f"{len(text.split())} words, {len(set(re.findall(r'[A-Za-z]+', text)))} distinct words"
    )


def check(text: str) -> None:
    assert text.isascii(), "corpus should be plain ASCII"
    assert 150_000 <= len(text.encode()) <= 300_000, len(text.encode())
    lower = Counter(re.findall(r"[a-z]+", text))
    upper = Counter(re.findall(r"[A-Z]{2,}", text))
    for w in needed_words():
        assert lower[w] >= MIN_LOWER, (w, lower[w])
        assert upper[w.upper()] >= MIN_UPPER or len(w) < 2, (w, upper[w.upper()])
    # no task-format lines: the base must not see the adapter tasks
    assert "Answer:" not in text and "Shout:" not in text and "Reverse:" not in text
    assert not re.search(r"\d{4}-\d{2}-\d{2}", text), "no ISO dates in the corpus"


if __name__ == "__main__":
    main()
