"""Shared word lists for make_corpus.py and make_generation.py.

Every word the generation domains (shout, reverse, dates, chat) put in a prompt comes from these
lists, and make_corpus.py guarantees each one appears in adapters/assets/corpus.txt many times in
lower case and at least a few times in UPPER case, so a byte-level BPE tokenizer trained on the
corpus knows them. Hand-written for Adaptory; CC0-1.0.
"""

DETERMINERS = ["the", "a", "my", "your", "his", "her", "our", "their", "this", "that", "one"]

COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "brown",
    "pink",
    "orange",
    "purple",
    "grey",
    "gold",
]

SIZES = [
    "big",
    "small",
    "little",
    "tall",
    "short",
    "long",
    "old",
    "new",
    "young",
    "soft",
    "warm",
    "cold",
    "happy",
    "sad",
    "quiet",
    "loud",
    "fast",
    "slow",
    "clean",
    "dirty",
]

ANIMALS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "cow",
    "pig",
    "sheep",
    "duck",
    "frog",
    "mouse",
    "rabbit",
    "fox",
    "bear",
    "lion",
    "goat",
    "hen",
    "owl",
    "bee",
    "ant",
]

OBJECTS = [
    "cup",
    "box",
    "ball",
    "book",
    "chair",
    "table",
    "bed",
    "door",
    "window",
    "hat",
    "coat",
    "shoe",
    "bag",
    "key",
    "lamp",
    "phone",
    "clock",
    "pen",
    "car",
    "bike",
    "boat",
    "kite",
    "bowl",
    "plate",
    "spoon",
    "mat",
    "rug",
    "sock",
    "cake",
    "apple",
    "bread",
    "egg",
    "milk",
    "tea",
    "toy",
    "drum",
    "map",
    "ring",
    "bell",
    "rope",
]

PEOPLE = [
    "man",
    "woman",
    "boy",
    "girl",
    "baby",
    "friend",
    "teacher",
    "farmer",
    "cook",
    "doctor",
    "king",
    "queen",
    "mother",
    "father",
    "sister",
    "brother",
]

NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Ella", "Leo", "Zoe", "Jack", "Nora"]

PLACES = [
    "house",
    "garden",
    "park",
    "shop",
    "school",
    "farm",
    "river",
    "lake",
    "hill",
    "town",
    "street",
    "kitchen",
    "room",
    "beach",
    "forest",
    "road",
    "field",
    "station",
    "market",
    "yard",
]

# intransitive-ish past tense verbs that read well as "the cat sat"
VERBS_PAST = [
    "sat",
    "ran",
    "jumped",
    "slept",
    "walked",
    "sang",
    "played",
    "stood",
    "fell",
    "smiled",
    "waited",
    "danced",
    "swam",
    "hid",
    "rolled",
    "laughed",
    "cried",
    "stopped",
    "looked",
    "rested",
]

# transitive past tense verbs: "the dog found a ball"
VERBS_TRANS = [
    "found",
    "saw",
    "took",
    "made",
    "lost",
    "held",
    "liked",
    "wanted",
    "had",
    "got",
    "moved",
    "carried",
    "washed",
    "opened",
    "closed",
    "painted",
    "dropped",
    "kept",
    "bought",
    "sold",
]

PREPOSITIONS = ["on", "in", "under", "by", "near", "behind", "over", "at", "into", "from"]

ADVERBS = ["today", "again", "slowly", "quickly", "now", "there", "here", "home", "away", "outside"]

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# words that the reverse domain shuffles: short, concrete, common
REVERSE_POOL = COLOURS + ANIMALS + OBJECTS + SIZES + NUMBERS + PLACES

PREFIX_WORDS = [
    "shout",
    "reverse",
    "answer",
    "date",
    "say",
    "please",
    "loud",
    "loudly",
    "words",
    "order",
    "back",
    "write",
    "capital",
    "letters",
    "this",
]


def generation_vocab() -> list[str]:
    """Every lower-case word that a generation prompt may contain (sorted, unique)."""
    words: set[str] = set()
    for group in (
        DETERMINERS,
        COLOURS,
        SIZES,
        ANIMALS,
        OBJECTS,
        PEOPLE,
        PLACES,
        VERBS_PAST,
        VERBS_TRANS,
        PREPOSITIONS,
        ADVERBS,
        NUMBERS,
        PREFIX_WORDS,
    ):
        words.update(group)
    words.update(["an", "and", "with", "is", "was", "to", "of"])
    return sorted(words)


_IRREGULAR = {
    "sheep": "sheep",
    "mouse": "mice",
    "fox": "foxes",
    "fish": "fish",
    "man": "men",
    "woman": "women",
    "baby": "babies",
    "box": "boxes",
    "brush": "brushes",
}


def plural(noun: str) -> str:
    return _IRREGULAR.get(noun, noun + "s")
