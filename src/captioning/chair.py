"""CHAIR on COCO: objects a caption mentions that the image's instance annotations do not contain.

After Rohrbach et al. (2018), "Object Hallucination in Image Captioning": the words of a caption are
mapped to COCO's 80 object categories through a word-to-category table (synonyms, plurals and
multi-word names: "men" -> person, "hot dog" -> hot dog, not dog), and every mentioned category is checked
against the categories of the image's instance annotations (``instances_<split><year>.json``).

- ``chair_i``: hallucinated mentions / all mentions (each category counted once per caption);
- ``chair_s``: captions with at least one hallucinated mention / all captions;
- ``recall``: annotated categories of an image that its caption mentions / all annotated categories.

The table is this project's own, written for COCO's categories; like the paper's it is a heuristic
(it cannot tell "a bat" the animal from a baseball bat, and reads "a hot dog" as food): use it to compare
captioners on the same images, not as an absolute truth. It scores strings only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["COCO_CATEGORY_WORDS", "CocoChair", "ChairCaption", "mentioned_categories", "singular"]

# the ball games whose name is also a ball: the sport ("playing baseball", "basketball court") unless an article
# makes it a thing ("throwing a football")
SPORTS = ("baseball", "football", "basketball", "volleyball", "softball")
# words naming a person on their own that also modify an animal ("a baby elephant", "an adult giraffe") or count a
# group ("a couple of zebras", "a family of elephants"); the next word decides
PERSON_MODIFIERS = ("baby", "adult")
GROUP_WORDS = ("couple", "family", "group", "herd", "pair", "flock", "crowd")
_ARTICLES = ("a", "an", "the", "this", "that", "his", "her", "their", "its", "one")

# category -> the words and phrases (singular) that name it. Multi-word phrases win over their parts.
COCO_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "person": ("person", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "guy", "lady",
               "gentleman", "people", "player", "skier", "surfer", "skateboarder", "snowboarder", "rider",
               "biker", "cyclist", "pedestrian", "adult", "teenager", "teen", "officer", "policeman", "cop",
               "chef", "cook", "worker", "soldier", "batter", "catcher", "pitcher", "umpire", "tennis player",
               "athlete", "mother", "father", "daughter", "son", "friend", "couple", "family", "crowd",
               "someone", "spectator", "customer", "driver", "passenger", "student", "bride", "groom", "male",
               "female", "businessman", "youngster", "baseball player", "soccer player",
               "football player", "frisbee player", "bicyclist", "cowboy", "skater", "traveler", "traveller",
               "doctor", "patient", "nurse", "tourist", "hiker", "jockey"),
    "bicycle": ("bicycle", "bike", "tricycle"),
    "car": ("car", "automobile", "sedan", "taxi", "cab", "suv", "van", "jeep", "minivan", "coupe", "police car"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "scooter", "moped", "dirt bike", "motor cycle"),
    "airplane": ("airplane", "aeroplane", "plane", "jet", "airliner", "aircraft", "jumbo jet", "jetliner",
                 "passenger jet", "biplane", "seaplane"),
    "bus": ("bus", "school bus", "double decker", "trolley bus", "minibus"),
    "train": ("train", "locomotive", "tram", "subway", "railcar", "passenger train", "freight train"),
    "truck": ("truck", "pickup", "pickup truck", "lorry", "fire truck", "firetruck", "semi truck", "dump truck"),
    "boat": ("boat", "ship", "sailboat", "kayak", "canoe", "yacht", "ferry", "raft", "vessel", "rowboat",
             "speedboat", "tugboat", "gondola", "sail boat"),
    "traffic light": ("traffic light", "stop light", "stoplight", "traffic signal", "street light"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench", "park bench"),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "owl", "eagle", "hawk",
             "sparrow", "crow", "pelican", "hen", "rooster", "penguin", "flamingo", "finch", "peacock",
             "ostrich", "heron", "crane", "turkey"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "doggy", "terrier", "retriever", "poodle", "bulldog", "labrador", "husky",
            "chihuahua", "dachshund", "collie", "beagle", "pug"),
    "horse": ("horse", "pony", "stallion", "mare", "foal", "colt"),
    "sheep": ("sheep", "lamb", "ram", "ewe"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "oxen", "steer", "heifer"),
    "elephant": ("elephant",),
    "bear": ("bear", "polar bear", "grizzly", "grizzly bear", "cub", "panda"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "back pack", "knapsack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse", "hand bag", "pocketbook"),
    "tie": ("tie", "necktie", "bow tie", "bowtie"),
    "suitcase": ("suitcase", "luggage", "suit case", "briefcase"),
    "frisbee": ("frisbee", "flying disc"),
    "skis": ("ski", "skis"),
    "snowboard": ("snowboard", "snow board"),
    # "baseball", "football", ... also name the sport ("playing baseball"): a ball only after an article, below
    "sports ball": ("ball", "sports ball", "soccer ball", "tennis ball", *SPORTS),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "mitt", "baseball mitt", "catcher's mitt"),
    "skateboard": ("skateboard", "skate board"),
    "surfboard": ("surfboard", "surf board", "longboard", "paddle board", "paddleboard"),
    "tennis racket": ("tennis racket", "racket", "racquet", "tennis racquet"),
    "bottle": ("bottle", "water bottle", "beer bottle", "wine bottle"),
    "wine glass": ("wine glass", "wineglass", "champagne glass"),
    "cup": ("cup", "mug", "coffee cup", "teacup", "tea cup"),
    "fork": ("fork",),
    "knife": ("knife", "knives"),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "panini", "cheeseburger"),
    "orange": ("orange", "tangerine", "clementine", "mandarin"),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog", "frankfurter"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake", "birthday cake", "wedding cake"),
    "chair": ("chair", "stool", "armchair", "recliner"),
    "couch": ("couch", "sofa", "loveseat", "love seat", "futon"),
    # a bare "plant" is as often a garden's or a factory's: only a plant in a pot counts
    "potted plant": ("potted plant", "houseplant", "house plant", "flowerpot", "flower pot", "plant pot",
                     "pot plant"),
    "bed": ("bed", "mattress", "crib"),
    "dining table": ("dining table", "table", "desk", "dinner table", "kitchen table", "coffee table"),
    "toilet": ("toilet", "urinal", "commode", "toilet seat"),
    "tv": ("tv", "television", "monitor", "screen", "tv screen", "flat screen"),
    "laptop": ("laptop", "computer", "notebook computer", "macbook"),
    "mouse": ("mouse", "computer mouse"),
    "remote": ("remote", "remote control", "controller", "game controller", "wii remote"),
    "keyboard": ("keyboard", "keypad"),
    "cell phone": ("cell phone", "cellphone", "phone", "smartphone", "smart phone", "mobile phone", "iphone"),
    "microwave": ("microwave", "microwave oven"),
    "oven": ("oven", "stove", "stovetop"),
    "toaster": ("toaster",),
    "sink": ("sink", "basin", "washbasin"),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel", "textbook", "magazine"),
    "clock": ("clock", "alarm clock", "clock tower"),
    "vase": ("vase",),
    "scissors": ("scissors", "scissor", "shears"),
    "teddy bear": ("teddy bear", "teddy", "stuffed bear", "stuffed animal", "teddybear"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer", "blow drier"),
    "toothbrush": ("toothbrush", "tooth brush"),
}

# phrases that contain a category's word but name no object of it ("a baseball field" holds no ball)
NOT_OBJECTS = ("baseball field", "baseball game", "baseball diamond", "baseball team", "baseball uniform",
               "baseball cap", "football field", "football game", "soccer field", "soccer game", "tennis court",
               "bus stop", "train station", "train track", "train platform", "dog food", "cat food", "hot dog stand",
               "ski slope", "ski lift", "ski pole", "ski resort", "surf board shop", "bike lane", "bike rack",
               "orange juice", "kite surfing", "kite surfer", "kite boarding", "kiteboarding")

# irregular plurals (and words whose plural rule would go wrong)
_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "people": "people", "persons": "person",
    "mice": "mouse", "knives": "knife", "geese": "goose", "oxen": "ox", "sheep": "sheep", "calves": "calf",
    "wolves": "wolf", "shelves": "shelf", "leaves": "leaf", "teeth": "tooth", "feet": "foot", "buses": "bus",
    "skis": "skis", "scissors": "scissors", "glasses": "glass", "benches": "bench", "sandwiches": "sandwich",
    "couches": "couch", "boxes": "box", "dishes": "dish", "brushes": "brush", "toothbrushes": "toothbrush",
    "watches": "watch", "ponies": "pony", "puppies": "puppy", "kitties": "kitty", "babies": "baby",
    "ladies": "lady", "guys": "guy", "cherries": "cherry", "skies": "sky", "doggies": "doggy",
    "taxis": "taxi", "teens": "teen", "ferries": "ferry", "lorries": "lorry", "vases": "vase",
    "gentlemen": "gentleman", "businessmen": "businessman", "policemen": "policeman", "cowboys": "cowboy",
    "oranges": "orange",
}
_WORD = re.compile(r"[a-z']+")


def singular(word: str) -> str:
    """A plural noun -> its singular, by a few English rules and a table of exceptions."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("ch", "sh", "x", "ss")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _normal(word: str) -> str:
    """A caption's word as the table holds it: possessive dropped ("man's" -> "man", "dogs'" -> "dog"), singular."""
    return singular(word.removesuffix("'s").rstrip("'"))


def _phrase_table(words: Mapping[str, Iterable[str]], not_objects: Iterable[str] = NOT_OBJECTS,
                  ) -> dict[tuple[str, ...], str]:
    """(singular words of a phrase) -> category; "" for phrases that name no object."""
    table: dict[tuple[str, ...], str] = {}
    for category, phrases in words.items():
        for phrase in (category, *phrases):
            table[tuple(_normal(w) for w in phrase.split())] = category
    for phrase in not_objects:
        table[tuple(_normal(w) for w in phrase.split())] = ""
    return table


_PHRASES = _phrase_table(COCO_CATEGORY_WORDS)
_MAX_WORDS = max(len(p) for p in _PHRASES)


def mentioned_categories(caption: str, table: Mapping[tuple[str, ...], str] = _PHRASES) -> list[str]:
    """The COCO categories a caption mentions, in order, each once. Longest phrases match first."""
    raw = _WORD.findall(caption.lower())
    words = [_normal(w) for w in raw]
    found: list[str] = []
    i = 0
    while i < len(words):
        for n in range(min(_MAX_WORDS, len(words) - i), 0, -1):
            category = table.get(tuple(words[i:i + n]))
            if category is not None:
                if category and category not in found and not (n == 1 and _modifier(raw, words, i, table)):
                    found.append(category)
                i += n
                break
        else:
            i += 1
    return found


def _modifier(raw: list[str], words: list[str], i: int, table: Mapping[tuple[str, ...], str]) -> bool:
    """Whether the one word at ``i`` that names a category does not name an object here: a colour, a sport, a
    person word modifying an animal, or a group word counting what follows."""
    word, following = words[i], words[i + 1] if i + 1 < len(words) else None
    names_a_thing_next = following is not None and bool(table.get((following,)))
    if raw[i] == "orange":  # "an orange cat": the colour (the plural "oranges" is always the fruit)
        return names_a_thing_next
    if word in SPORTS:  # "playing baseball", "a basketball court": the sport; "throwing a football": the ball
        return i == 0 or words[i - 1] not in _ARTICLES
    if word in PERSON_MODIFIERS:  # "a baby elephant" is an elephant; "a baby in a crib" a person
        return names_a_thing_next and table.get((following,)) != "person"
    if word in GROUP_WORDS:  # "a couple of zebras": zebras; "a couple sitting on a bench": people
        return following == "of"
    return False


@dataclass
class ChairCaption:
    """One caption's mentioned categories, split into those the image has and those it does not."""

    mentioned: list[str]
    hallucinated: list[str] = field(default_factory=list)
    recalled: int = 0
    annotated: int = 0

    @property
    def correct(self) -> bool:
        return bool(self.mentioned) and not self.hallucinated

    def summary(self) -> str:
        if not self.mentioned:
            return "names no COCO object"
        if not self.hallucinated:
            return "true"
        return "not in the image: " + ", ".join(self.hallucinated)


class CocoChair:
    """CHAIR-i / CHAIR-s of captions against COCO instance annotations.

    ``objects``: {image_id: the category names of its instance annotations} (an image with none is an
    empty set: every object its caption mentions is then hallucinated). Called with {image_id: caption},
    returns ``chair_i``, ``chair_s``, ``precision`` (= 1 - chair_i), ``recall`` and ``mentions`` (objects
    mentioned per caption).
    """

    KEYS = ("chair_i", "chair_s", "precision", "recall", "mentions")

    def __init__(self, objects: Mapping[int, Iterable[str]]) -> None:
        if not objects:
            raise ValueError("CocoChair needs the instance categories of at least one image.")
        known = set(COCO_CATEGORY_WORDS)
        self.objects = {int(i): set(c) for i, c in objects.items()}
        unknown = {c for cats in self.objects.values() for c in cats} - known
        if unknown:
            raise ValueError(f"CocoChair: categories {sorted(unknown)[:5]} are not COCO's 80 object categories; "
                             "pass the category names of instances_<split><year>.json.")

    @property
    def image_ids(self) -> frozenset[int]:
        """The images whose truth this scorer knows."""
        return frozenset(self.objects)

    def details(self, predictions: Mapping[int, str]) -> dict[int, ChairCaption]:
        missing = [i for i in predictions if int(i) not in self.objects]
        if missing:
            raise ValueError(f"CocoChair: no instance annotations for image ids {missing[:5]}; score the split "
                             "the instances file describes.")
        results = {}
        for image_id, caption in predictions.items():
            present = self.objects[int(image_id)]
            mentioned = mentioned_categories(caption)
            results[image_id] = ChairCaption(mentioned, [c for c in mentioned if c not in present],
                                             sum(c in present for c in mentioned), len(present))
        return results

    def __call__(self, predictions: Mapping[int, str]) -> dict[str, float]:
        return self.summarize(self.details(predictions))

    @staticmethod
    def summarize(details: Mapping[int, ChairCaption]) -> dict[str, float]:
        results = list(details.values())
        mentions = sum(len(r.mentioned) for r in results)
        hallucinated = sum(len(r.hallucinated) for r in results)
        annotated = sum(r.annotated for r in results)
        chair_i = hallucinated / mentions if mentions else 0.0
        return {
            "chair_i": chair_i,
            "chair_s": sum(bool(r.hallucinated) for r in results) / len(results) if results else 0.0,
            "precision": 1.0 - chair_i if mentions else 0.0,
            "recall": sum(r.recalled for r in results) / annotated if annotated else 0.0,
            "mentions": mentions / len(results) if results else 0.0,
        }
