"""Word lists for the synthetic world's titles and ad texts.

Every word that appears in a title is tied to a hidden latent vector in `synth.py` (categories, brands, attributes),
so that the text of an item carries the signal that drives its labels.
"""

PRODUCT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "running shoes": ("running shoes", "trail runners", "road running sneakers"),
    "hiking boots": ("hiking boots", "trekking boots", "mountain boots"),
    "dresses": ("summer dress", "maxi dress", "midi dress"),
    "jeans": ("slim jeans", "straight leg jeans", "denim jeans"),
    "jackets": ("rain jacket", "puffer jacket", "softshell jacket"),
    "t-shirts": ("cotton t-shirt", "graphic tee", "crew neck t-shirt"),
    "handbags": ("leather handbag", "tote bag", "crossbody bag"),
    "watches": ("analog watch", "chronograph watch", "dress watch"),
    "smartphones": ("smartphone", "5g phone", "android phone"),
    "laptops": ("laptop", "ultrabook", "gaming laptop"),
    "headphones": ("wireless headphones", "noise cancelling headphones", "earbuds"),
    "cameras": ("mirrorless camera", "action camera", "compact camera"),
    "coffee makers": ("espresso machine", "drip coffee maker", "pour over kettle"),
    "cookware": ("nonstick frying pan", "cast iron skillet", "stainless saucepan"),
    "blenders": ("countertop blender", "smoothie blender", "hand blender"),
    "vacuum cleaners": ("robot vacuum", "cordless vacuum", "bagless vacuum cleaner"),
    "skincare": ("face moisturizer", "vitamin c serum", "sunscreen lotion"),
    "makeup": ("matte lipstick", "mascara", "foundation"),
    "fragrances": ("eau de parfum", "cologne", "body mist"),
    "toys": ("building blocks", "plush toy", "remote control car"),
    "board games": ("strategy board game", "party card game", "family board game"),
    "books": ("mystery novel", "cookbook", "science fiction novel"),
    "yoga gear": ("yoga mat", "yoga blocks", "resistance bands"),
    "bicycles": ("mountain bike", "road bike", "city bicycle"),
    "camping gear": ("camping tent", "sleeping bag", "camping stove"),
    "pet supplies": ("dog bed", "cat scratching post", "dog leash"),
    "garden tools": ("pruning shears", "garden hose", "lawn mower"),
    "furniture": ("office chair", "bookshelf", "sofa bed"),
}

CONTENT_TOPICS: dict[str, tuple[str, ...]] = {
    "cooking": ("weeknight pasta recipes", "baking sourdough bread", "healthy meal prep"),
    "travel": ("budget travel in europe", "weekend city breaks", "backpacking southeast asia"),
    "fitness": ("home workouts", "marathon training", "strength training for beginners"),
    "fashion trends": ("spring fashion trends", "capsule wardrobe ideas", "street style looks"),
    "tech reviews": ("smartphone camera comparison", "best laptops for students", "smart home gadgets"),
    "parenting": ("toddler sleep tips", "screen time for kids", "family road trips"),
    "personal finance": ("saving for retirement", "index fund investing", "monthly budgeting"),
    "gardening": ("growing tomatoes", "balcony gardens", "composting at home"),
    "gaming": ("open world games", "indie game picks", "esports highlights"),
    "beauty": ("skincare routines", "natural makeup looks", "hair care tips"),
    "home decor": ("small apartment decor", "minimalist living rooms", "cozy bedroom ideas"),
    "pets": ("puppy training", "cat nutrition", "adopting a rescue dog"),
}

# attribute word -> (appeal to click, effect on quality / satisfaction)
PRODUCT_ATTRIBUTES: dict[str, tuple[float, float]] = {
    "premium": (0.3, 0.6),
    "budget": (0.2, -0.5),
    "lightweight": (0.2, 0.2),
    "waterproof": (0.2, 0.3),
    "durable": (0.1, 0.5),
    "vintage": (0.0, 0.1),
    "eco-friendly": (0.1, 0.3),
    "limited edition": (0.4, 0.2),
    "bestselling": (0.5, 0.4),
    "refurbished": (-0.3, -0.4),
    "oversized": (-0.1, -0.1),
    "handmade": (0.1, 0.4),
    "compact": (0.1, 0.1),
    "classic": (0.0, 0.2),
    "generic": (-0.5, -0.6),
    "discounted": (0.3, -0.2),
    "professional": (0.2, 0.5),
    "imported": (0.0, 0.0),
    "unbranded": (-0.4, -0.5),
    "award-winning": (0.4, 0.6),
}

CONTENT_ATTRIBUTES: dict[str, tuple[float, float]] = {
    "ultimate guide to": (0.4, 0.4),
    "quick tips on": (0.3, 0.1),
    "a beginner's guide to": (0.3, 0.3),
    "an in-depth look at": (0.1, 0.5),
    "what nobody tells you about": (0.6, -0.3),
    "10 mistakes in": (0.5, 0.0),
    "the science of": (0.0, 0.4),
    "my honest take on": (0.2, 0.1),
    "everything about": (0.1, 0.0),
    "a short note on": (-0.3, -0.2),
}

CONTENT_TYPES = ("article", "video")

AD_PHRASES: dict[str, float] = {
    "save 20% on": 0.3,
    "new arrival:": 0.2,
    "free shipping on": 0.4,
    "shop the": 0.0,
    "limited offer:": 0.3,
    "discover": -0.1,
    "top rated": 0.4,
    "last chance for": 0.2,
}

BRAND_SYLLABLES = ("ka", "lo", "ven", "tri", "mor", "zen", "qui", "dar", "ex", "lu", "no", "va", "rix", "sol", "ter")

AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
GENDERS = ("f", "m", "u")
ACTIVITY_LEVELS = ("low", "medium", "high")
DEVICES = ("ios", "android", "web")
