"""English text for calibrating and evaluating quantized sentence-embedding models
(all-MiniLM-L6-v2).

Every sentence here was written for this project; none is taken from a public data set.

``CALIBRATION`` (64 sentences) is tokenized into calibration samples when a model is quantized.
``EVALUATION`` (128 sentences, disjoint from ``CALIBRATION``) is embedded by the float and the
quantized model to compare them, e.g. by the cosine similarity of matching embeddings and by the
Spearman correlation of all pairwise cosine similarities. For the latter to be a sensitive measure,
``EVALUATION`` mixes about 32 pairs of related sentences (close paraphrases down to loosely shared
topics), scattered through the list, with unrelated ones, so the pairwise similarities spread over a
wide range.

Both lists span many topics and registers (science, cooking, sports, finance, law, medicine, travel,
history, programming, music, weather, chat, questions, reviews, instructions, news, verse, dates and
numbers, names, commands and code) and lengths from 3 to about 60 words: roughly a third under 10
words, a third from 10 to 25, and a third over 25.
"""

__all__ = ["CALIBRATION", "EVALUATION"]

CALIBRATION = [
    "SELECT name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name;",
    "Preheat the oven to 220 °C and roast the vegetables for about twenty-five minutes.",
    "Can you recommend a good book about the history of mathematics for a curious teenager?",
    "Patients with type 2 diabetes are often advised to monitor their blood glucose every morning.",
    "Turn left at the bakery.",
    "Take two tablets with water.",
    (
        "Caching the compiled kernels on disk cut our cold-start latency from roughly nine seconds to "
        "under one, although the cache directory now grows by several hundred megabytes per model."
    ),
    (
        "Please note that the pharmacy will be closed on 25 and 26 December, and prescriptions ordered "
        "after 3 p.m. on the 23rd will not be ready until the following Monday."
    ),
    "The marathon record fell on Sunday when the winner crossed the line in 2:00:35.",
    "The Treaty of Westphalia, signed in 1648, ended decades of war across central Europe.",
    "The soup needs more salt.",
    "I'm running about ten minutes late; please start the meeting without me.",
    "The defendant pleaded not guilty, and the judge set the trial date for the fourteenth of March.",
    (
        "The gradient of the loss with respect to each weight is computed by backpropagation, and the "
        "optimizer then nudges every weight a small step in the direction that lowers the loss."
    ),
    "Shares of the chipmaker jumped 12% after quarterly revenue beat analysts' expectations.",
    "Photosynthesis converts light into chemical energy.",
    (
        "The startup's founder, Priya Raman, told reporters that the company had signed deals with three "
        "hospitals in Ohio and planned to hire another forty engineers before the end of the year."
    ),
    "def add(a, b): return a + b",
    "Thanks, that really helped!",
    (
        "When the first settlers arrived in the valley, they found a wide river, dense forests of oak and "
        "beech, and soil so rich that almost anything they planted grew within weeks, and for years "
        "afterwards they traded their surplus grain with merchants who rowed up the river from the coast."
    ),
    "Mitochondria produce most of the chemical energy that a cell needs to power its reactions.",
    "The violin section came in late.",
    "Do you know whether the train to Kyoto stops at Nagoya or goes straight through?",
    "Run `pip install -e .` from the repository root, then execute the test suite with pytest.",
    (
        "If the function receives an empty list it should return None rather than raising an exception, "
        "because callers upstream already check for a missing value and handle it gracefully."
    ),
    (
        "Stars like the Sun spend most of their lives fusing hydrogen into helium in their cores, and only "
        "when that fuel runs low do they swell into red giants and shed their outer layers."
    ),
    "A hash map offers average constant-time lookups, but its worst case can degrade to linear time.",
    (
        "Hey, are you still coming to the barbecue on Saturday? We need someone to bring ice and maybe a "
        "folding table, and Sam says he can give you a ride if you need one. Also, tell me if you are "
        "bringing anyone, because I am trying to work out how many burgers to buy and whether we will need "
        "a second grill."
    ),
    "The jazz trio played until midnight, trading solos over a slow, smoky blues.",
    "Is the museum open on Mondays?",
    "Under the old moon the river keeps its silver promises to nobody.",
    (
        "There is an hour, just after the snow stops, when the whole street holds its breath and the lamps "
        "seem to hum a little song meant only for the people still awake."
    ),
    "Water boils at 100 degrees Celsius at sea level, but at a lower temperature on a mountain.",
    (
        "My grandmother used to say that a good stew cannot be rushed, so every Sunday she let the beef, "
        "onions, carrots and red wine simmer on the stove for most of the afternoon."
    ),
    "Ada Lovelace wrote the first published algorithm.",
    "Good morning, everyone!",
    "Sell in May and go away?",
    "Meet me at 7:30 p.m. sharp.",
    (
        "Beethoven completed his Ninth Symphony in 1824, when he was almost completely deaf, and at the "
        "premiere a singer had to turn him around so he could see the audience applauding."
    ),
    (
        "Doctors recommend at least 150 minutes of moderate exercise each week, such as brisk walking or "
        "cycling, along with two sessions of strength training for the major muscle groups."
    ),
    "Rome was not built in a day.",
    "She scored twice before halftime.",
    (
        "The central bank kept its benchmark rate unchanged at 4.25 percent on Wednesday, saying that "
        "inflation was cooling but remained above its two percent target for the third consecutive year."
    ),
    (
        "In the final minutes of the championship game, the underdogs stole the ball at midcourt, raced "
        "down the floor, and hit a three-pointer at the buzzer to win by a single point."
    ),
    "After three weeks of drought, farmers in the valley are finally hoping for a few days of steady rain.",
    "Honestly, the headphones sound great, but the ear cushions started cracking after only two months.",
    "Interest rates rose again today.",
    "Fog settled over the harbor.",
    "The city council voted 7 to 2 to expand the bike lane network by 2027.",
    "Error 404: page not found.",
    (
        "Why do cats knock things off tables? Some experts think it is play, others think it is a bid for "
        "attention, and many owners are convinced it is simple mischief."
    ),
    (
        "To reset the router, unplug it from the wall, wait at least thirty seconds, plug it back in, and "
        "then hold the small button on the back for ten seconds until the lights blink."
    ),
    "Silence, then the slow rain.",
    "Where did I leave my keys?",
    "The recipe calls for two cups of flour, one egg, and a pinch of baking soda.",
    (
        "Between 1939 and 1945 the Second World War drew in more than thirty countries and caused an "
        "estimated 70 to 85 million deaths, making it the deadliest conflict in human history."
    ),
    (
        "The itinerary includes two nights in Marrakesh, a long drive over the Atlas Mountains, a camel "
        "trek into the desert at sunset, and a final morning exploring the blue streets of Chefchaouen."
    ),
    (
        "Forecasters expect a cold front to sweep through the region overnight, bringing thunderstorms, "
        "gusty winds of up to 80 kilometres per hour, and a sharp drop in temperature by Friday morning."
    ),
    (
        "I bought this vacuum cleaner after reading dozens of reviews, and although the battery life is "
        "shorter than advertised, it picks up pet hair better than any machine I have owned."
    ),
    "Our flight to Lisbon was delayed by four hours, so we spent the night at an airport hotel.",
    "This blender is loud but powerful.",
    (
        "The contract states that either party may terminate the agreement with ninety days' written "
        "notice, provided that all outstanding invoices have been paid in full before the termination "
        "date."
    ),
    "Court adjourned until Thursday morning.",
    (
        "The new regulation requires banks to hold more capital against risky loans, which supporters say "
        "will make the system safer, while critics argue it will reduce lending to small businesses."
    ),
]

EVALUATION = [
    "A sudden hailstorm shredded the tomato plants in our garden within ten minutes.",
    "Octopuses have three hearts and blue blood, and they can change colour in a fraction of a second.",
    (
        "Somewhere beyond the last streetlight, the road forgets its name and becomes a path, and the path "
        "becomes a rumour of grass, and the grass becomes the long dark breathing of the hills."
    ),
    "Use `git bisect` to find the commit that introduced the regression between v1.2 and v1.4.",
    (
        "The Roman Empire reached its greatest extent under Trajan around 117 AD, stretching from Britain "
        "in the northwest to Mesopotamia in the east and encompassing perhaps sixty million people."
    ),
    "The court ruled that the company had violated the privacy rights of its users.",
    (
        "Honestly, I thought the sequel would be terrible, but the story was tighter, the jokes landed, "
        "and the final twenty minutes had the whole cinema cheering, so I might even go see it again next "
        "week."
    ),
    (
        "Storing weights as int8 instead of 32-bit floats reduces memory fourfold, and on most hardware "
        "the lower-precision arithmetic also runs faster, though accuracy may slip slightly."
    ),
    (
        "During the storm the lighthouse keeper climbed the spiral stairs every hour to trim the wick and "
        "polish the lens, because a single dark minute could send a ship onto the rocks below."
    ),
    (
        "Glaciers in the Alps have lost more than half of their volume since 1931, and scientists warn "
        "that, at the current rate of warming, many smaller ones could vanish entirely before the end of "
        "the century."
    ),
    "Who painted the ceiling of the Sistine Chapel?",
    (
        "To cook a proper risotto, pour in hot broth gradually, stirring each addition until the grains "
        "soak it up, and stop after roughly twenty minutes when the rice is tender with a little bite."
    ),
    "A cat naps on the couch.",
    (
        "For an even finish, clean the wall first, patch any holes, wait for the filler to dry, sand it "
        "flat, and prime the surface before you start painting."
    ),
    (
        "On Saturday the museum unveiled an expansion displaying over two hundred Dutch Golden Age "
        "paintings, a number of which are being exhibited abroad for the first time."
    ),
    "Serena Williams won twenty-three Grand Slam singles titles.",
    "Our hotel room had a lovely view of the sea, but the walls were thin.",
    "Chop the garlic finely.",
    "Drivers heading into the hills should carry chains, since a major winter storm is on the way.",
    "Napoleon was exiled to Elba in 1814.",
    "The volcano on the island erupted at dawn, sending a column of ash eight kilometres into the sky.",
    (
        "Hi Tom, just checking whether you got my email about the budget; I need your numbers by Wednesday "
        "so I can put the slides together before the board meeting on Thursday afternoon."
    ),
    "The forecast promises a hot, clear weekend with temperatures near 28 °C.",
    (
        "If you are travelling with a pet, check the airline's rules well in advance, because many "
        "carriers limit the number of animals per cabin and require a veterinary certificate issued within "
        "ten days of departure."
    ),
    "My phone battery died.",
    (
        "Set the environment variable CUDA_VISIBLE_DEVICES=0 before launching the script, otherwise the "
        "framework may try to allocate memory on every GPU in the machine and crash with an out-of-memory "
        "error."
    ),
    "The Great Wall was built and rebuilt over many centuries by successive Chinese dynasties.",
    "The chess grandmaster resigned after move forty-one, having lost his queen to a clever knight fork.",
    (
        "The jury deliberated for nearly three days before returning a split verdict, convicting the "
        "former mayor on two counts of fraud while acquitting him on the more serious charge of bribery."
    ),
    "Taking antibiotics for a cold won't help, because colds are caused by viruses, not bacteria.",
    "What time does the pharmacy close?",
    "The plumber said the leak came from a corroded pipe behind the kitchen wall.",
    "Lock the door when you leave.",
    "October undresses the trees.",
    (
        "Researchers found that students who slept fewer than six hours before an exam recalled noticeably "
        "less of the material than classmates who slept eight hours, even when both groups had studied for "
        "the same amount of time. The authors suggest that memory consolidation during deep sleep may "
        "explain the gap, although they caution that the study was small."
    ),
    "Jupiter has at least ninety-five moons.",
    "Firefighters contained the blaze after six hours, and no injuries were reported.",
    (
        "This laptop is light enough to carry all day and the screen is gorgeous, but the keyboard feels "
        "shallow and the fan gets noisy whenever I open more than a few browser tabs."
    ),
    (
        "At its height in the early second century, Rome ruled a territory running from the British Isles "
        "to the Persian Gulf, home to tens of millions of inhabitants."
    ),
    "Mortgage applications rose for the third straight week as borrowing costs eased slightly.",
    "Pass the salt, please.",
    "He missed the last bus home.",
    (
        "To make a simple vinaigrette, whisk three parts olive oil with one part vinegar, then season with "
        "salt, pepper, and a little mustard."
    ),
    "The printer is jammed again.",
    "The leaves let go of autumn.",
    "Happy birthday, Grandpa Joe!",
    "Judges found the firm guilty of breaching customers' right to privacy.",
    "Before the symphony began, the musicians adjusted their instruments to the note played by the oboist.",
    "Honey never spoils; archaeologists have found edible honey in ancient Egyptian tombs.",
    (
        "The surgeon explained that the knee replacement would take about two hours, that most patients "
        "walk with a frame the next day, and that full recovery usually takes three to six months of "
        "physiotherapy."
    ),
    (
        "Risotto needs constant attention: add the warm stock one ladle at a time, stir until it is "
        "absorbed, and keep going for about eighteen minutes until the rice is creamy but still slightly "
        "firm."
    ),
    (
        "The quarterback threw for over three hundred yards and two touchdowns, but a late interception in "
        "the red zone ended his team's hopes of reaching the playoffs this season."
    ),
    (
        "Should I learn Rust or Go first if I mostly want to build web services, command-line tools, and "
        "the occasional small game, and I already know a fair amount of Python and JavaScript?"
    ),
    "Why is the sky blue?",
    (
        "Dear Ms. Okafor, thank you for your application; we are pleased to invite you to a second "
        "interview on Thursday, 12 June, at 10:00 a.m. at our offices on Harbour Street."
    ),
    "Saturn's rings are mostly made of ice.",
    (
        "The museum's new wing, which opened to the public on Saturday, houses more than two hundred "
        "paintings by Dutch masters, including several works that have never before been shown outside the "
        "Netherlands, as well as a restored altarpiece that took a team of conservators almost four years "
        "to clean."
    ),
    "Could you ring me again in a bit?",
    (
        "A binary search halves the search interval at every step, so it runs in logarithmic time on a "
        "sorted array."
    ),
    "Never trust a silent parrot.",
    (
        "Some languages, such as Finnish and Hungarian, have more than a dozen grammatical cases, which "
        "means that a single noun can take many different endings depending on its role in a sentence."
    ),
    (
        "The recipe for my aunt's lemon cake has been handed down for four generations, and the secret, "
        "she says, is folding in the whipped egg whites gently and never opening the oven door too early."
    ),
    (
        "Heavy snow is expected across the northern mountains tonight, with up to forty centimetres at "
        "higher elevations."
    ),
    "When does the chemist shut tonight?",
    (
        "The package was supposed to arrive on Tuesday, but the tracking page has said 'out for delivery' "
        "for three days now, and nobody at customer service seems to know where it actually is."
    ),
    "Wow, I can't believe you finished the whole puzzle in one evening!",
    (
        "The coffee grinder is sturdy and easy to clean, and the burrs produce a remarkably even grind, "
        "but at almost two hundred dollars it is hard to recommend to anyone who only drinks one cup a "
        "day."
    ),
    "Putting all your savings into a single company's shares is a gamble most advisers warn against.",
    "Roger Federer retired from tennis in 2022.",
    (
        "Renters breaking their lease ahead of schedule are required to notify the property owner in "
        "writing sixty days in advance, and they risk losing their deposit if nobody takes over the flat."
    ),
    "She hummed an old folk tune while repairing the fishing nets on the dock.",
    "Bitcoin dropped below $60,000 overnight.",
    "He didn't catch the final bus back.",
    "Can you call me back later?",
    "Welcome aboard flight 227 to Oslo.",
    "I love fresh bread.",
    (
        "A costly turnover near the goal line in the fourth quarter sealed a season-ending defeat, despite "
        "an otherwise brilliant passing performance from the young quarterback."
    ),
    (
        "Staying hydrated matters: your body relies on water to regulate temperature, cushion joints, and "
        "flush out toxins, and even mild dehydration can leave you tired and foggy."
    ),
    (
        "Before you paint a wall, wash it with mild soap, fill any cracks with filler, let it dry "
        "overnight, sand the patches smooth, and apply a coat of primer so the colour goes on evenly."
    ),
    "Antibiotics are useless against viral infections such as the common cold or the flu.",
    "The dentist found two cavities.",
    (
        "Inflation in the eurozone slowed to 2.4 percent in November, down from 2.9 percent a month "
        "earlier, as energy prices fell and food costs stabilised, according to preliminary figures "
        "released on Friday."
    ),
    "Kids under twelve travel free on weekends when accompanied by a paying adult.",
    "We meet on the third of May, 2025.",
    (
        "The committee will meet on the first Tuesday of every month, except in August, and any member who "
        "misses three consecutive meetings without an apology may be asked to step down."
    ),
    "The beach resort was beautiful, though we could hear the neighbours all night.",
    "It's supposed to be sunny and warm all weekend, with highs around twenty-eight degrees.",
    "Who left the milk out?",
    "The fire was brought under control by crews following a six-hour battle; nobody was hurt.",
    "How do I reverse a list in Python?",
    (
        "I returned the tablet after a week: the display was sharp and the battery lasted forever, yet "
        "typing on the attached keyboard cover felt cramped and uncomfortable."
    ),
    "x = np.zeros((3, 4), dtype=np.int8)",
    (
        "Drinking enough water throughout the day helps the kidneys filter waste, keeps joints lubricated, "
        "and can reduce headaches, so many doctors suggest carrying a refillable bottle wherever you go."
    ),
    (
        "Grandpa insists the best way to catch trout is at dawn, standing perfectly still in the cold "
        "shallows, with a fly he tied himself the night before while listening to the radio."
    ),
    "My neighbour's rooster starts crowing at four in the morning, every single day.",
    (
        "Because each comparison discards half of the remaining elements, binary search on sorted data "
        "takes O(log n) time."
    ),
    "The meeting is on 3 May 2025.",
    (
        "Long before clocks, sailors measured their speed by throwing a wooden board attached to a knotted "
        "rope overboard and counting how many knots slipped through their fingers in a fixed time."
    ),
    "Mount Everest is 8,849 metres tall.",
    "Stars are ancient, patient fires.",
    "Is it normal for a puppy to sleep eighteen hours a day?",
    "What's the easiest way to reverse a Python list?",
    "git rebase -i HEAD~3",
    "The stock market fell sharply on Monday after disappointing jobs figures were released.",
    (
        "The spreadsheet has 12,480 rows, one per transaction, with columns for date, amount, currency, "
        "merchant and category, and about two percent of the rows are missing a category label."
    ),
    (
        "Quantizing a neural network to eight-bit integers shrinks the model to roughly a quarter of its "
        "original size and often speeds up inference, usually at the cost of a small drop in accuracy."
    ),
    "The night train from Vienna to Venice crosses the Alps while most passengers are asleep.",
    "Five stars, would buy again.",
    "The concert was sold out.",
    "Please fill in the form in block capitals and sign at the bottom of page two.",
    "The orchestra tuned to a single A from the oboe before the conductor raised her baton.",
    "Brazil beat Argentina 2-1 in Rio.",
    (
        "A tenant who wishes to end the lease early must give the landlord at least two months' notice in "
        "writing and may forfeit the security deposit unless a replacement tenant is found."
    ),
    (
        "A basic salad dressing is just oil, vinegar, a spoonful of mustard and some seasoning shaken "
        "together in a jar."
    ),
    "The elevator is out of order.",
    "HTTP status 503 means the server is temporarily unable to handle the request.",
    "Diversifying your portfolio across stocks, bonds and real estate can reduce risk over the long term.",
    (
        "The function iterates over every key in the dictionary, lowercases it, strips surrounding "
        "whitespace, and writes the cleaned pair into a new mapping, which it returns once the loop has "
        "finished."
    ),
    "The bakery opens at six.",
    "The cat is sleeping on the sofa.",
    "Every ticket for the show was gone.",
    "Weak employment data sent share prices tumbling at the start of the week.",
    "The hospital opened a new pediatric ward with forty beds and a small rooftop playground.",
    "Flying is faster, but I prefer waking up to mountain views from a sleeper carriage.",
    (
        "In 1969, Neil Armstrong and Buzz Aldrin spent about two and a half hours walking on the lunar "
        "surface, collecting rock samples and planting a flag while Michael Collins orbited overhead."
    ),
    "The library will extend its opening hours during the exam period in December and January.",
    "The documentary follows three families rebuilding their lives after the earthquake of 2011.",
    (
        "After the factory closed, the small town lost nearly a third of its population within a decade, "
        "as young families moved to the coast in search of work and the main street filled with empty "
        "shops, until only a bakery, a pharmacy and one stubborn old cinema still kept their lights on."
    ),
]
