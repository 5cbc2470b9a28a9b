"""Held-out English text for the language model's build-time and benchmark accuracy figures (teacher-forced
agreement between variants). Public-domain passages; nothing calibrates on them."""

PASSAGES = (
    # Jane Austen, Pride and Prejudice (1813), chapter 1.
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.",
    # Charles Darwin, On the Origin of Species (1859), introduction.
    "When on board H.M.S. Beagle, as naturalist, I was much struck with certain facts in the distribution of the "
    "organic beings inhabiting South America, and in the geological relations of the present to the past "
    "inhabitants of that continent. These facts, as will be seen in the latter chapters of this volume, seemed to "
    "throw some light on the origin of species.",
    # Jerome K. Jerome, Three Men in a Boat (1889), chapter 1.
    "There were four of us - George, and William Samuel Harris, and myself, and Montmorency. We were sitting in my "
    "room, smoking, and talking about how bad we were - bad from a medical point of view I mean, of course. We "
    "were all feeling seedy, and we were getting quite nervous about it.",
    # Mary Shelley, Frankenstein (1818), letter 1.
    "You will rejoice to hear that no disaster has accompanied the commencement of an enterprise which you have "
    "regarded with such evil forebodings. I arrived here yesterday, and my first task is to assure my dear sister "
    "of my welfare and increasing confidence in the success of my undertaking.",
)
