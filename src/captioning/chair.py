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

# category -> the words and phrases (singular) that name it. Multi-word phrases win over their parts.
COCO_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "person": ("person", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "guy", "lady",
               "gentleman", "people", "player", "skier", "surfer", "skateboarder", "snowboarder", "rider",
               "biker", "cyclist", "pedestrian", "adult", "teenager", "teen", "officer", "policeman", "cop",
               "chef", "cook", "worker", "soldier", "batter", "catcher", "pitcher", "umpire", "tennis player",
               "athlete", "mother", "father", "daughter", "son", "friend", "couple", "family", "crowd",
               "someone", "spectator", "customer", "driver", "passenger", "student", "bride", "groom", "male",
               "female", "businessman", "youngster", "baseball player", "soccer player",
               "football player", "frisbee player"),
    "bicycle": ("bicycle", "bike", "tricycle"),
    "car": ("car", "automobile", "sedan", "taxi", "cab", "suv", "van", "jeep", "minivan", "coupe", "police car"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "scooter", "moped", "dirt bike", "motor cycle"),
    "airplane": ("airplane", "aeroplane", "plane", "jet", "airliner", "aircraft", "jumbo jet", "jetliner",
                 "passenger jet"),
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
             "sparrow", "crow", "pelican", "chicken", "hen", "rooster", "penguin", "flamingo", "finch"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "doggy", "terrier", "retriever", "poodle", "bulldog", "labrador", "husky",
            "chihuahua", "dachshund", "collie", "beagle", "pug"),
    "horse": ("horse", "pony", "stallion", "mare", "foal", "colt"),
    "sheep": ("sheep", "lamb", "ram", "ewe"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "oxen", "steer", "heifer"),
    "elephant": ("elephant",),
    "bear": ("bear", "polar bear", "grizzly", "grizzly bear", "cub"),
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
    "sports ball": ("ball", "sports ball", "baseball", "football", "soccer ball", "tennis ball", "basketball",
                    "volleyball", "softball", "soccer ball"),
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
    "hot dog": ("hot dog", "hotdog", "frankfurter", "sausage"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake", "birthday cake", "wedding cake"),
    "chair": ("chair", "stool", "armchair", "recliner"),
    "couch": ("couch", "sofa", "loveseat", "love seat", "futon"),
    "potted plant": ("potted plant", "houseplant", "house plant", "plant", "flowerpot", "flower pot"),
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


def _phrase_table(words: Mapping[str, Iterable[str]], not_objects: Iterable[str] = NOT_OBJECTS,
                  ) -> dict[tuple[str, ...], str]:
    """(singular words of a phrase) -> category; "" for phrases that name no object."""
    table: dict[tuple[str, ...], str] = {}
    for category, phrases in words.items():
        for phrase in (category, *phrases):
            table[tuple(singular(w) for w in phrase.split())] = category
    for phrase in not_objects:
        table[tuple(singular(w) for w in phrase.split())] = ""
    return table


_PHRASES = _phrase_table(COCO_CATEGORY_WORDS)
_MAX_WORDS = max(len(p) for p in _PHRASES)


def mentioned_categories(caption: str, table: Mapping[tuple[str, ...], str] = _PHRASES) -> list[str]:
    """The COCO categories a caption mentions, in order, each once. Longest phrases match first."""
    words = [singular(w) for w in _WORD.findall(caption.lower())]
    found: list[str] = []
    i = 0
    while i < len(words):
        for n in range(min(_MAX_WORDS, len(words) - i), 0, -1):
            category = table.get(tuple(words[i:i + n]))
            if category is not None:
                # "an orange cat": the colour, not the fruit
                adjective = category == "orange" and n == 1 and i + 1 < len(words) and bool(table.get((words[i + 1],)))
                if category and not adjective and category not in found:
                    found.append(category)
                i += n
                break
        else:
            i += 1
    return found


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
