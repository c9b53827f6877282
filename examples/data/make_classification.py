"""Generate the text-classification datasets (reviews, support, news) for Adaptory's LoRA
adapters on the MiniLM sentence encoder.

    python examples/data/make_classification.py

Every sentence below was hand-written for Adaptory (CC0-1.0). Some contain slots such as {item}
or {order} that are filled from hand-written lists with a fixed seed, so one written sentence can
yield a few training rows. The written sentences of each label are split *before* filling: a
sentence (or template) lands either in train or in eval, never in both, so eval rows are new
wordings, not train rows with a different product name. The quality-bar files for the reviews
domain (quality_train.jsonl / quality_heldout.jsonl) are fixed hand-written lists, not templates.
Ends with a self-check: JSON parses, fields, balance, no train/eval overlap or near-duplicates.
Kept as one file (~1,090 lines, mostly the hand-written sentences): data and script travel together.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

SEED = 1234
HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------------
# reviews
# ------------------------------------------------------------------------------------------------

ITEMS = [
    "blender",
    "toaster",
    "kettle",
    "coffee maker",
    "frying pan",
    "knife set",
    "rice cooker",
    "phone charger",
    "keyboard",
    "wireless mouse",
    "speaker",
    "smartwatch",
    "tablet case",
    "desk lamp",
    "webcam",
    "power bank",
    "jacket",
    "sweater",
    "rain coat",
    "backpack",
    "water bottle",
    "yoga mat",
    "board game",
    "jigsaw puzzle",
    "toy car",
    "building set",
    "hair dryer",
    "vacuum cleaner",
    "phone case",
    "lunch box",
    "umbrella",
    "pillow",
]

REVIEW_POS = [
    # hand-written, category specific
    "The battery lasts all day and the screen is bright even in sunlight.",
    "These earbuds sound amazing for the price and stay put when I run.",
    "Setup took two minutes and the picture quality is stunning.",
    "My old laptop feels new again with this fast little drive.",
    "The charger is compact and fills my phone in under an hour.",
    "Crisp sound, deep bass, and the Bluetooth connects instantly.",
    "This monitor is sharp, easy on the eyes, and the stand is sturdy.",
    "The remote is simple enough that my grandmother uses it without help.",
    "Makes perfect toast every time, and the crumb tray slides out easily.",
    "This pan heats evenly and nothing sticks, not even eggs.",
    "The knives arrived razor sharp and still cut beautifully after months.",
    "Our new dishwasher is so quiet we forget it is running.",
    "The kettle boils fast and switches off by itself. Exactly what we needed.",
    "Best coffee I have made at home; the grinder is a real upgrade.",
    "The slow cooker turns cheap cuts into tender dinners with no effort.",
    "I could not put this novel down and finished it in one weekend.",
    "A warm, funny memoir that made me laugh out loud on the train.",
    "The recipes are clear, the photos are gorgeous, and everything we tried worked.",
    "This guide explains tricky ideas in plain words. I finally understand statistics.",
    "My daughter asks for this picture book every single night.",
    "The characters feel real and the ending surprised me in the best way.",
    "The sweater is soft, warm, and has not pilled after many washes.",
    "These jeans fit perfectly right out of the box.",
    "The boots kept my feet dry on a week of muddy hikes.",
    "Lovely dress, true to size, and the fabric feels expensive.",
    "Comfortable running shoes; my knees stopped aching after the first week.",
    "The jacket is light but blocks the wind really well.",
    "The kids have played with this train set every day since Christmas.",
    "Sturdy blocks, bright colours, and no sharp edges. Great for toddlers.",
    "This puzzle was challenging in a fun way and the pieces fit snugly.",
    "My son built the whole rocket kit himself and was so proud.",
    "The board game is quick to learn and the whole family loves it.",
    "The plush bunny is soft, well stitched, and survived the washing machine.",
    "The garden hose does not kink and the nozzle has useful settings.",
    "This vacuum picks up dog hair from the carpet in one pass.",
    "The mattress is firm but comfy, and my back pain is gone.",
    "These towels are thick, absorbent, and still fluffy after washing.",
    "The shampoo smells lovely and leaves my hair soft and shiny.",
    "The sunscreen is not greasy and does not sting my eyes.",
    "This yoga mat has great grip, even during sweaty classes.",
    "The bike lock is heavy and solid, and I feel safe leaving my bike outside.",
    "The tent went up in ten minutes and stayed dry through a storm.",
    "The dog bed is cosy and my old lab sleeps on it all afternoon.",
    "The cat tower is stable and my cats fight over the top spot.",
    "Beautiful mug, sturdy handle, and it keeps my tea hot for ages.",
    "The suitcase rolls smoothly and survived three flights without a scratch.",
    "Honestly the best headphones I have owned; the noise cancelling is superb.",
    "This desk chair supports my back through long work days.",
    "The printer was easy to connect and the prints look sharp.",
    "My plants are thriving under this grow light.",
    "Bought it for my mum and she uses it every day. Very pleased.",
    "Works exactly as described, and customer service answered my question within an hour.",
    "Solid build quality for such a low price. I am impressed.",
    "It replaced two gadgets on my counter and does both jobs better.",
    "The instructions were clear and assembly took less than half an hour.",
    "I was sceptical, but it really does make mornings easier.",
    "Nice packaging, fast delivery, and the product itself is excellent.",
    "After six months of daily use it still works like the first day.",
    "Light, well made, and it looks even better than in the photos.",
    "I bought a second one as a gift because I love mine so much.",
    # templates with {item}
    "The {item} arrived quickly and works exactly as described.",
    "I use this {item} every day and it has never let me down.",
    "Really happy with the {item}; it feels well made and solid.",
    "Great value. The {item} does everything the pricier brands do.",
    "The {item} was a thoughtful gift and my sister loves it.",
    "Five stars for the {item}. It looks great and works even better.",
    "This {item} exceeded my expectations in every way.",
    "Easy to use, easy to clean, and the {item} looks smart too.",
    "I would happily buy this {item} again.",
    "The {item} is sturdy, reliable, and worth every penny.",
    "So glad I chose this {item}; it made my routine simpler.",
    "The {item} feels premium and arrived in perfect condition.",
    "Our whole family enjoys the {item}. Highly recommended.",
    "The {item} is light and compact, and it does the job well.",
    "Three months in and the {item} still looks brand new.",
    "I was nervous ordering a {item} online, but it is perfect.",
    "The {item} is even nicer in person than in the pictures.",
    "Love this {item}! Simple, reliable, and nicely designed.",
    "The {item} fixed a problem I had struggled with for years.",
    "My second {item} from this brand, and again no complaints at all.",
    "Quick delivery, good price, and the {item} works brilliantly.",
    "A lovely {item}; the colour is rich and the finish is smooth.",
    "Best {item} I have bought in a long time.",
    "The {item} does its job quietly and well. Very satisfied.",
    "Absolutely delighted with this {item}.",
    "The {item} is well thought out and pleasant to use.",
    "Ordered the {item} on Monday, using it happily by Wednesday.",
    "Cannot fault the {item}. Good design and good quality.",
    "The {item} made a great birthday present for my dad.",
    "Top marks for the {item}; it is sturdy and looks great.",
    "I am very pleased with the {item} and have told all my friends.",
    "This {item} is a joy to use every morning.",
    "The {item} has held up well to daily use by three kids.",
    "A smart little {item} that does exactly what I hoped.",
    "The {item} works perfectly and the price was fair.",
    "Happy customer here: the {item} is excellent.",
    "The {item} looks stylish and performs really well.",
    "If you are on the fence about this {item}, just buy it.",
    "The {item} arrived well packed and works like a charm.",
    "This {item} is a real bargain for the quality you get.",
]

REVIEW_NEG = [
    # hand-written, category specific
    "The battery dies by lunchtime even with the screen dimmed.",
    "These earbuds crackle constantly and the left one keeps disconnecting.",
    "The screen had a dead pixel right in the middle when it arrived.",
    "The charger gets alarmingly hot and barely charges my phone.",
    "The Bluetooth drops every few minutes, which makes calls impossible.",
    "The remote stopped responding after a week and new batteries did not help.",
    "The webcam image is blurry and dark even in a bright room.",
    "The toaster burns one side and leaves the other side pale.",
    "Food sticks to this so-called non-stick pan after two uses.",
    "The blender leaked all over the counter the very first time.",
    "The handle of the kettle wobbles and the lid will not close properly.",
    "The coffee tastes like plastic no matter how many times I rinse it.",
    "The knives were dull out of the box and one already has rust spots.",
    "The microwave plate does not turn and the food stays cold in the middle.",
    "The plot drags on forever and the ending made no sense.",
    "Half the recipes in this cookbook are missing steps or amounts.",
    "The pages fell out of the binding within a week of reading.",
    "A dull, repetitive book; I gave up after three chapters.",
    "The translation is clumsy and full of errors.",
    "The print is so tiny that it gives me a headache.",
    "The sweater shrank two sizes after one gentle wash.",
    "The seams on these jeans split the second time I wore them.",
    "The colour of the dress looks nothing like the photo.",
    "The boots leaked in the first rain and now my socks are always wet.",
    "These shoes rub my heels raw; I cannot wear them for more than an hour.",
    "The zip on the jacket broke on the third day.",
    "The toy car stopped moving after ten minutes of play.",
    "Several puzzle pieces were missing, so we could never finish it.",
    "The paint on these blocks chipped off and my toddler was chewing flakes.",
    "The doll's arm snapped off on Christmas morning. My daughter cried.",
    "The board game rules are confusing and the cards are flimsy.",
    "The drone crashed on its first flight and will not turn on now.",
    "The hose split at the connector and sprayed water everywhere.",
    "This vacuum loses suction after a few minutes and smells of burning.",
    "The mattress sagged in the middle within a month.",
    "The towels shed fluff all over everything and feel rough.",
    "The shampoo left my scalp itchy and my hair greasy.",
    "This cream caused a red rash on my face the first night.",
    "The yoga mat smells of chemicals and slides around on the floor.",
    "The tent pole snapped while we were setting it up.",
    "The suitcase wheel fell off before I even left the airport.",
    "My dog chewed through this so-called tough toy in five minutes.",
    "The cat litter box cracked along the bottom in the first week.",
    "The desk chair squeaks loudly and leans to one side.",
    "The printer jams on nearly every page and the ink runs out fast.",
    "The grow light flickers and half the LEDs are already dead.",
    "It broke the second time I used it. Complete waste of money.",
    "The product looks cheap and nothing like the listing photos.",
    "Assembly instructions were wrong and two screws were missing.",
    "It arrived scratched and dented, with the box torn open.",
    "Customer service ignored my emails for three weeks.",
    "Stopped working a day after the return window closed. Typical.",
    "Far too loud to use in a flat; the neighbours complained.",
    "The smell was so strong we had to leave it on the balcony.",
    "I returned it the next day. Flimsy and badly made.",
    "It worked for one month and then died completely.",
    "Overpriced for what you get; the cheaper version was better.",
    "It does not fit the model it claims to fit.",
    "The buttons stick and the display is hard to read.",
    "Really disappointed. It feels like a toy, not a tool.",
    # templates with {item}
    "The {item} arrived broken and the replacement was no better.",
    "I regret buying this {item}; it stopped working in a week.",
    "The {item} feels cheap and flimsy in the hand.",
    "Do not waste your money on this {item}.",
    "The {item} looks nothing like the photos online.",
    "One star. The {item} failed after just a few uses.",
    "The {item} rattles and feels loose every time I use it.",
    "Sending the {item} back. It simply does not work.",
    "The {item} came with a crack down the side.",
    "Very poor quality; the {item} fell apart within days.",
    "The {item} started falling apart within a fortnight.",
    "I expected much more from a {item} at this price.",
    "The {item} smells strongly of plastic and the smell will not go.",
    "The {item} was clearly used before; it came dirty and scratched.",
    "Awful {item}. It stopped working right after the warranty ended.",
    "The {item} is badly designed and awkward to use.",
    "My {item} broke on the first day. Very disappointing.",
    "The {item} never worked properly, not even once.",
    "The {item} is much smaller than described and poorly finished.",
    "Would not recommend this {item} to anyone.",
    "The {item} feels unsafe and badly put together.",
    "I have had nothing but trouble with this {item}.",
    "The {item} is the worst purchase I have made this year.",
    "The {item} had a fault the first time I used it.",
    "The {item} arrived two weeks late and did not even work.",
    "The colour of the {item} faded after a few days.",
    "The {item} was unusable after a month.",
    "The {item} is clumsy to handle and poorly made.",
    "Save yourself the hassle and skip this {item}.",
    "The {item} broke as soon as my son touched it.",
    "Cheap materials; the {item} cracked within a week.",
    "The {item} does not do half of what the description promises.",
    "Very unhappy with the {item}; it is already falling apart.",
    "The {item} already has a loose part. Returning it.",
    "Total letdown. The {item} is clumsy and unreliable.",
    "The {item} was missing parts and support was useless.",
    "The {item} scratches if you so much as look at it.",
    "Gave the {item} a fair chance, but it is just bad.",
    "The {item} came without instructions and never worked.",
    "Regret this {item}. Poor build and worse performance.",
]

# quality bar: 50 short, plainly worded reviews (25/25) ...
QUALITY_TRAIN_POS = [
    "Great product, works perfectly.",
    "I love it, very good quality.",
    "Arrived fast and works well.",
    "Excellent value for money.",
    "Very happy with this purchase.",
    "Nice design and easy to use.",
    "Works as described, highly recommend.",
    "Good quality and fair price.",
    "My kids love this toy.",
    "Comfortable and fits well.",
    "The sound is clear and loud.",
    "Sturdy and well made.",
    "Really useful kitchen tool.",
    "Beautiful colour, looks great.",
    "A wonderful book, I enjoyed it.",
    "Battery life is excellent.",
    "Perfect gift for my friend.",
    "Does the job very well.",
    "Soft, warm and cosy.",
    "Fast delivery, great item.",
    "I would buy this again.",
    "Simple to set up and reliable.",
    "Better than I expected.",
    "Keeps my coffee hot for hours.",
    "Five stars, no complaints.",
]
QUALITY_TRAIN_NEG = [
    "Broke after one day.",
    "Poor quality, do not buy.",
    "Arrived damaged and late.",
    "Waste of money.",
    "Very disappointed with this.",
    "Hard to use and confusing.",
    "Does not work as described.",
    "Too expensive for what it is.",
    "My kids were bored in minutes.",
    "Uncomfortable and too small.",
    "The sound is tinny and quiet.",
    "Flimsy and badly made.",
    "Useless in the kitchen.",
    "The colour is ugly and dull.",
    "A boring book, I gave up.",
    "Battery dies very quickly.",
    "Terrible gift, it was returned.",
    "Does not do the job.",
    "Rough, scratchy and thin.",
    "Slow delivery, bad item.",
    "I would never buy this again.",
    "Setup failed and it keeps crashing.",
    "Worse than I expected.",
    "Coffee goes cold in minutes.",
    "One star, many complaints.",
]

# ... and 25 held-out reviews in a clearly different voice: slang, typos, terse or long
QUALITY_HELDOUT = [
    ("ngl this thing slaps, been using it nonstop since it showed up", "positive"),
    ("10/10 would recommend to literally anyone", "positive"),
    (
        "Honestly? Obsessed. My flat finally smells like a bakery every weekend thanks to this "
        "bread machine.",
        "positive",
    ),
    ("works gr8, no probs so far", "positive"),
    (
        "Bought it for the grandkids expecting it to last a week. Three months later they are "
        "still fighting over whose turn it is. Money well spent.",
        "positive",
    ),
    ("absolute gem of a kettle tbh", "positive"),
    ("Chuffed to bits. Proper sturdy and dead easy to clean.", "positive"),
    (
        "As a retired electrician I am picky about chargers, and this one is genuinely well "
        "engineered and runs cool.",
        "positive",
    ),
    ("yesss finally a hoodie that doesnt shrink!!", "positive"),
    ("solid. does what it says. happy", "positive"),
    ("my cat is OBSESSED with it lol, best few quid ive spent", "positive"),
    ("Superb read. Kept me up til 3am, no regrets whatsoever.", "positive"),
    ("wow. just wow. the sound on these is unreal", "positive"),
    ("total junk, fell apart in like 2 days smh", "negative"),
    ("Do. Not. Bother.", "negative"),
    (
        "I have owned many vacuums over forty years and this is, without exaggeration, the worst; "
        "it clogs constantly and spits dust back out.",
        "negative",
    ),
    ("recieved it broke, seller wont answer, avoid", "negative"),
    ("meh... nah, actually worse than meh. straight in the bin", "negative"),
    ("Gutted. Zip went on day one and the stitching is coming undone already.", "negative"),
    ("this blender is a joke, cant even crush ice lol", "negative"),
    (
        "Ordered for my son's birthday; the wheels snapped off before the cake was cut. "
        "Never again.",
        "negative",
    ),
    ("smells like burnt plastic every time i turn it on. no thx", "negative"),
    ("rubbish. returned.", "negative"),
    ("Utterly tedious novel, I kept checking how many pages were left.", "negative"),
    ("wasted my money big time, screen went black after a week", "negative"),
]

# ------------------------------------------------------------------------------------------------
# support
# ------------------------------------------------------------------------------------------------

SUPPORT = {
    "billing": [
        "I was charged twice for order {order}, please refund one of the payments.",
        "Why did my subscription price go up this month without any notice?",
        "I cancelled my plan last week but I was still billed {amount}.",
        "Can I get a copy of the invoice for my last payment?",
        "My card was declined even though there is plenty of money in the account.",
        "Please update the VAT number shown on my invoices.",
        "I still have not received the refund you promised for order {order}.",
        "The checkout added a fee of {amount} that I did not agree to.",
        "How do I switch from monthly to yearly billing?",
        "There is a charge on my bank statement I do not recognise.",
        "Can I pay by bank transfer instead of credit card?",
        "My discount code was not applied and I paid full price.",
        "I want to change the card you charge every month.",
        "You took {amount} from my account for a plan I never signed up for.",
        "The receipt shows the wrong company name; we need it corrected for accounting.",
        "When will the money for my returned {product} be paid back?",
        "I was billed for three seats but our team only uses two.",
        "Is there a student discount on the premium plan?",
        "My free trial turned into a paid plan without any reminder.",
        "Please explain the extra line item called service charge on my bill.",
        "I paid {amount} but the order still says payment pending.",
        "Can you split this payment over several months?",
        "The price at checkout was higher than the price on the product page.",
        "I need an itemised receipt for my expense report.",
        "Your system charged me in dollars instead of euros.",
        "Please stop the automatic renewal; I do not want to be charged again.",
        "I was refunded only part of the amount for order {order}.",
        "Why was I charged a late payment fee of {amount}?",
        "Gift card balance was not deducted and my card was charged instead.",
        "How much will I pay if I upgrade in the middle of the month?",
        "My payment failed but the money has left my account.",
        "Could you resend the credit note for the cancelled order?",
        "I was promised a price match but never received the difference.",
        "Can I get a refund for the unused months of my annual plan?",
        "The bill for {month} is double what it normally is.",
        "Please remove the insurance add-on I did not ask to pay for.",
        "Does the quoted price include tax?",
        "I need to change the billing address printed on my invoice.",
        "Could you tell me why my last payment was taken twice?",
        "The annual fee was charged a month early.",
        "I was overcharged on my last bill and would like the difference back.",
        "Do you accept PayPal for monthly payments?",
        "My invoice lists a product I returned weeks ago.",
        "I paid for express postage but want that money refunded since it came late.",
        "Can you waive the cancellation fee? I only joined yesterday.",
        "The coupon says ten percent off, but the total did not change.",
        "Please confirm that my direct debit has been set up correctly.",
        "I see a pending charge of {amount} that never went through.",
        "Why does my statement show two different prices for the same plan?",
        "I would like to downgrade to the cheaper plan from next month.",
        "The company card we use for billing has expired; how do I replace it?",
        "How long does a refund usually take to reach my account?",
    ],
    "shipping": [
        "My package for order {order} has not arrived and it was due {days} days ago.",
        "The tracking number you sent does not show any updates.",
        "Can I change the delivery address for an order that has already shipped?",
        "The courier left my parcel outside in the rain.",
        "Do you deliver to {country}, and how long does it take?",
        "My order arrived with the box crushed and the {product} inside is dented.",
        "Tracking says delivered but nothing came to my door.",
        "I only received one of the two items I ordered.",
        "How much is express delivery to a rural address?",
        "Can I pick up my order from a local collection point instead?",
        "The parcel has been stuck at the depot for a week.",
        "I ordered a blue {product} but a red one was delivered.",
        "Please hold my delivery; I am away until next {weekday}.",
        "The driver says he could not find my address, but it is clearly signed.",
        "When will my pre-order actually ship?",
        "The estimated delivery date keeps moving back.",
        "Is there a way to schedule delivery for the evening?",
        "My package was delivered to my neighbour without a note.",
        "The customs fees on my parcel were not mentioned at checkout.",
        "Can you send the rest of my order in one box instead of several?",
        "My order shows as shipped but the carrier has never received it.",
        "The parcel was returned to you as undeliverable; please resend it.",
        "How do I arrange a collection to return a large {product}?",
        "Someone signed for my parcel and it was not me.",
        "Will my order arrive before {weekday}? It is a birthday present.",
        "The box arrived open and a few items are missing.",
        "Why is shipping so expensive for such a small item?",
        "Can you upgrade my order {order} to next-day delivery?",
        "The delivery slot I booked was missed and nobody called.",
        "Your website says free shipping, but I was charged for postage.",
        "Which courier do you use for international orders?",
        "My parcel has been out for delivery for three days now.",
        "Please leave parcels with the building reception in future.",
        "The {product} arrived late and the gift was for yesterday.",
        "Is it possible to ship to a post office box?",
        "The return label you emailed will not print.",
        "Could you split my order so the in-stock items come first?",
        "The delivery van damaged our gate when dropping off the parcel.",
        "Where is my parcel? It has not moved since {weekday}.",
        "The package was left at the wrong house down the street.",
        "Can I add something to my order before it is dispatched?",
        "How long does standard delivery take to {country}?",
        "The courier tried to deliver while I was home but left a card anyway.",
        "My parcel is marked as lost in transit. What happens now?",
        "The box was soaking wet when it arrived and the contents are ruined.",
        "Could you send my order to my office instead of my home?",
        "Has order {order} left the warehouse yet?",
        "The delivery note says two boxes, but only one turned up.",
        "I need this order delivered before I move house on {weekday}.",
        "The tracking page says address problem; can you fix it?",
        "Do you offer same-day delivery in the city centre?",
        "My parcel was sent back to the depot after a failed delivery attempt.",
    ],
    "technical": [
        "The app crashes every time I open the settings page.",
        "My {product} will not connect to the home wifi after the update.",
        "I get error {error} when I try to upload a file.",
        "The website keeps loading forever in {browser}.",
        "The {product} turns on but the screen stays black.",
        "Sync between my phone and laptop stopped working yesterday.",
        "Notifications are not showing up on my Android phone.",
        "The firmware update failed halfway and now the device will not start.",
        "Bluetooth pairing with my car fails every time.",
        "The export to PDF button does nothing when I click it.",
        "The {product} makes a clicking noise and then shuts down.",
        "Videos in the app freeze after a few seconds.",
        "The search bar returns no results even for simple words.",
        "I cannot install the desktop app on {os}; it says the package is damaged.",
        "The battery on my {product} drains overnight even when it is switched off.",
        "The camera in the app shows a black screen on my tablet.",
        "How do I reset the {product} to factory settings?",
        "The printer shows as offline even though it is connected.",
        "Since the latest version the app uses all my phone's memory.",
        "The touchscreen responds to taps in the wrong place.",
        "My smart bulb keeps disconnecting from the hub.",
        "The API returns a timeout error for every request since this morning.",
        "Dark mode makes some of the buttons invisible.",
        "The {product} overheats after about ten minutes of use.",
        "Which version of the driver works with {os}?",
        "The voice assistant does not understand any commands anymore.",
        "Uploaded photos appear sideways in the gallery.",
        "The page shows a blank white screen after I press submit.",
        "The speaker crackles whenever the volume is above half.",
        "Calendar events are duplicated after syncing.",
        "The sensor reads the wrong temperature by several degrees.",
        "The game lags badly even on the lowest graphics settings.",
        "My files disappeared from the cloud folder after the update.",
        "The fingerprint reader stopped recognising my finger.",
        "The {product} does not charge with the cable it came with.",
        "Keyboard shortcuts stopped working in the editor.",
        "The app says I am offline when my internet works fine.",
        "After the update the {product} restarts on its own every hour.",
        "The login button does nothing on the mobile site.",
        "My {product} shows a red light and will not boot.",
        "Audio and video are out of sync in every recording.",
        "The app freezes when I try to attach a photo.",
        "Error {error} appears whenever I save a document.",
        "The {product} loses its wifi connection several times a day.",
        "The installer stops at ninety percent and rolls back.",
        "The screen flickers when the brightness is low.",
        "Push notifications arrive hours late on my phone.",
        "The {product} will not pair with the companion app.",
        "Every time I scan a document the scanner software crashes.",
        "The charts on the dashboard do not load in {browser}.",
        "The microphone is not detected during video calls.",
        "Which settings should I use to connect the {product} to my TV?",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "How do I change the email address on my account?",
        "Please delete my account and all my personal data.",
        "Someone logged into my account from another country.",
        "I want to merge my two accounts into one.",
        "My account was locked after too many login attempts.",
        "How do I turn on two-factor authentication?",
        "I lost my phone and can no longer get the login codes.",
        "Can I change my username without losing my history?",
        "I never created this account, but I am getting emails for it.",
        "How do I add a family member to my profile?",
        "The verification link in the sign-up email has expired.",
        "Please update the phone number linked to my profile.",
        "I cannot log in with Google anymore; it says the account does not exist.",
        "How can I download a copy of all the data you hold about me?",
        "My profile picture will not update no matter what I upload.",
        "I would like to transfer ownership of the team account to a colleague.",
        "Why was my account suspended without any warning?",
        "How do I unsubscribe from your marketing emails?",
        "I think my account was hacked; my password no longer works.",
        "Can I have two profiles under the same login?",
        "I changed my name after getting married and need it updated.",
        "Please remove my old address from my saved addresses.",
        "How do I close my account but keep my order history?",
        "The security questions on my account are ones I never set.",
        "I would like to reactivate my old account from {year}.",
        "My child made an account using my email; please remove it.",
        "How do I give my assistant access to my account?",
        "The login page says my email is not registered, but I have used it for years.",
        "I want to change which email receives the security alerts.",
        "Can you confirm whether my account was deleted as I asked?",
        "How do I sign out of all devices at once?",
        "Please change my account language to {language}.",
        "I keep getting logged out every few minutes.",
        "Can I recover an account I deleted by mistake last week?",
        "My account shows someone else's name and address.",
        "How do I make my profile private?",
        "I need to update my date of birth on my account.",
        "I am locked out of my profile and the recovery code does not work.",
        "How can I change the password for my account?",
        "Please remove my card details and personal info from your records.",
        "I signed up twice by accident; can you delete the second profile?",
        "The two-step login code never reaches my phone.",
        "Can I change the email I use to sign in?",
        "I got a message that my password was changed, but I did not do it.",
        "How do I set up a separate login for my teenager?",
        "My username shows as taken even though it is mine.",
        "I want to stop sharing my profile with my ex-partner.",
        "Where can I see which devices are logged in to my account?",
        "Please confirm my account is verified; the badge disappeared.",
        "How do I link my account to my new phone number?",
        "I cannot update my profile because the save button is greyed out.",
    ],
}

SUPPORT_FILL = {
    "order": lambda r: f"#{r.randint(10000, 99999)}",
    "amount": lambda r: (
        r.choice(["$", "£", "€"]) + f"{r.randint(5, 250)}.{r.choice(['00', '99', '50', '49'])}"
    ),
    "product": lambda r: r.choice(
        [
            "speaker",
            "router",
            "tablet",
            "headset",
            "smart watch",
            "camera",
            "printer",
            "laptop",
            "thermostat",
            "e-reader",
        ]
    ),
    "days": lambda r: r.choice(["three", "four", "five", "six", "ten", "several"]),
    "country": lambda r: r.choice(
        ["Canada", "Ireland", "Norway", "Portugal", "Australia", "Japan", "Mexico", "Poland"]
    ),
    "weekday": lambda r: r.choice(
        ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
    ),
    "month": lambda r: r.choice(["March", "April", "June", "August", "October", "November"]),
    "error": lambda r: r.choice(["E-102", "403", "500", "0x80070005", "ERR_TIMEOUT", "E-17"]),
    "browser": lambda r: r.choice(["Chrome", "Firefox", "Safari", "Edge"]),
    "os": lambda r: r.choice(["Windows 11", "macOS", "Ubuntu", "my Chromebook"]),
    "year": lambda r: str(r.randint(2012, 2021)),
    "language": lambda r: r.choice(["Spanish", "German", "French", "Italian", "Dutch"]),
}

# ------------------------------------------------------------------------------------------------
# news
# ------------------------------------------------------------------------------------------------

NEWS = {
    "sports": [
        "{team} beat {team2} 3-1 to reach the cup final",
        "Veteran striker scores twice as {team} climb to second place",
        "Tennis champion knocked out in straight sets at the Open",
        "{team} sack head coach after five straight defeats",
        "Marathon record falls as runner breaks two hours ten on the coast",
        "Injury rules star goalkeeper out for the rest of the season",
        "Late penalty earns {team} a dramatic draw away from home",
        "Cyclist takes the yellow jersey after brutal mountain stage",
        "Swimmer wins third gold medal at the world championships",
        "Rookie quarterback leads stunning comeback in overtime",
        "{team} sign teenage midfielder on five-year contract",
        "Rain delays final day of the test match",
        "Boxing title fight postponed after champion injures hand",
        "Women's hockey team qualify for the Olympics",
        "Golfer sinks long putt on the last hole to win by one stroke",
        "{team} fans celebrate first league title in forty years",
        "Sprinter stripped of medal after failed doping test",
        "Underdogs {team} knock champions out of the cup",
        "Captain announces retirement after fifteen seasons",
        "Basketball star signs record deal to stay with {team}",
        "Ski jumper sets hill record in windy conditions",
        "Referee decision sparks fury at the end of the derby",
        "National rugby side name new captain ahead of the tour",
        "{team} unveil plans for a new 40,000-seat stadium",
        "Teenage chess prodigy becomes youngest grandmaster in the country",
        "Relay team drop the baton and miss out on the final",
        "Transfer window closes with {team} making a late signing",
        "Cricket captain hits century to save the series",
        "Formula One driver starts from pole after stunning qualifying lap",
        "Coach praises young squad after narrow semi-final defeat",
        "Goalless draw leaves {team} bottom of the table",
        "Figure skater lands historic quadruple jump",
        "Rowing crew win the annual river race by three lengths",
        "Club fined after fans throw objects onto the pitch",
        "{team} extend unbeaten run to twelve matches",
        "Olympic champion returns to the track after long injury",
        "Volleyball team clinch title in a five-set thriller",
        "Boxer wins world title in front of home crowd",
        "{team} thrash {team2} 5-0 in one-sided derby",
        "Star winger out for six weeks with hamstring strain",
        "Fifteen-year-old wins national gymnastics title",
        "Wimbledon finalist pulls out of next week's tournament",
        "Record crowd watches women's football final",
        "Jockey wins the Grand National on an outsider",
        "{team} and {team2} share the points in tense draw",
        "Sailing crew finish round-the-world race in record time",
        "Manager says {team} must improve defending before playoffs",
        "Darts champion hits nine-darter in the final",
        "Mountain bike world cup cancelled after heavy snow",
        "Baseball pitcher throws perfect game in season opener",
        "Cup holders crash out on penalties",
        "Wrestler announces comeback at the age of forty",
    ],
    "science": [
        "Astronomers spot water vapour in the atmosphere of a distant planet",
        "New fossil suggests early birds could fly further than thought",
        "Researchers grow miniature human livers in the lab",
        "Deep-sea expedition finds dozens of unknown species",
        "Study links poor sleep to weaker memory in older adults",
        "Space telescope captures sharpest image yet of a star nursery",
        "Scientists create battery that charges in under a minute",
        "Ancient DNA reveals how farming spread across the continent",
        "Coral reefs show signs of recovery after heatwave, survey finds",
        "Physicists measure the mass of a particle with record precision",
        "New antibiotic kills drug-resistant bacteria in mouse trials",
        "Volcano monitoring team detects rising magma beneath the island",
        "Rover drills into Martian rock and finds traces of ancient lakes",
        "Bees can count up to five, experiment suggests",
        "Researchers map the brain of a fruit fly neuron by neuron",
        "Melting glaciers expose forests frozen for thousands of years",
        "Gene therapy restores partial sight in clinical trial",
        "Comet will be visible to the naked eye next month, astronomers say",
        "Robot fish helps biologists study how shoals move",
        "Study finds microplastics in fresh snow on remote mountains",
        "Quantum computer solves problem in minutes that would take years",
        "Whales use songs to find each other across ocean basins, data shows",
        "Chemists turn waste carbon dioxide into plastic building blocks",
        "Largest ever survey of insects reveals steep decline",
        "Earthquake sensors pick up faint signals from deep inside the planet",
        "Vaccine for common childhood virus shows strong results in trial",
        "Archaeologists uncover a 3,000-year-old village under a lake",
        "Solar panels made from new material break efficiency record",
        "Crows can plan ahead, according to a new study",
        "Satellite data shows sea levels rising faster than predicted",
        "Doctors use 3D printing to build a replacement windpipe",
        "Tiny worm survives after 40,000 years in frozen soil",
        "Researchers find gut bacteria that may influence mood",
        "Probe sends back first close-up photos of an asteroid",
        "Lab-grown meat passes early safety review",
        "Scientists detect ripples in space-time from colliding black holes",
        "Ancient tree rings reveal history of solar storms",
        "Octopuses appear to dream, researchers report",
        "Scientists find a new species of frog in the cloud forest",
        "Study shows dogs can read human facial expressions",
        "New telescope detects the oldest galaxy ever observed",
        "Researchers develop blood test that spots cancer early",
        "Mars helicopter completes its longest flight",
        "Genetic study traces domestic cats back to ancient farmers",
        "Engineers build a robot that can climb walls like a gecko",
        "Antarctic ice core reveals climate of 800,000 years ago",
        "Plants can warn each other of insect attacks, study finds",
        "Physicists cool atoms to a billionth of a degree above absolute zero",
        "Meteor shower to peak this weekend, astronomers say",
        "Brain implant lets paralysed patient type with thoughts",
        "Dinosaur footprints discovered on a beach after storm",
        "Sleeping sharks spotted for the first time in the wild",
        "{uni} team designs a solar cell as thin as paper",
        "{uni} biologists show that ants use the sun to navigate",
        "Telescope built by {uni} spots a planet orbiting two stars",
        "{uni} study finds bats hunt by listening to the wind",
        "Researchers at {uni} grow wheat that needs half the water",
        "{uni} chemists make glue inspired by mussels",
        "Physicists at {uni} build a more accurate atomic clock",
        "{uni} geologists warn of landslide risk after record rainfall",
    ],
    "business": [
        "{company} shares jump {pct} after strong quarterly profits",
        "Central bank holds interest rates steady for third month",
        "Carmaker recalls 200,000 vehicles over faulty brakes",
        "{company} to cut 1,200 jobs as sales slow",
        "Inflation eases to its lowest level in two years",
        "Retailer reports record holiday sales as online orders soar",
        "Oil prices fall as supply fears ease",
        "{company} agrees takeover of smaller rival in 2 billion deal",
        "Start-up raises 50 million to build cheaper electric scooters",
        "Airline warns of higher fares as fuel costs climb",
        "House prices rise {pct} over the past year",
        "{company} chief executive steps down after profit warning",
        "Supermarket chain freezes prices on basic groceries",
        "Stock markets slide on fears of a global slowdown",
        "Coffee prices hit a ten-year high after poor harvest",
        "Bank fined for failing to stop money laundering",
        "{company} opens new factory, creating 800 jobs",
        "Unemployment falls to its lowest level since the crisis",
        "Chipmaker's revenue doubles on demand for AI hardware",
        "Small businesses struggle as energy bills rise",
        "Clothing brand shuts forty stores to focus on online sales",
        "Investors pull money from tech funds for a second week",
        "{company} shares fall {pct} after weak forecast",
        "Shipping costs surge as ports face long delays",
        "Streaming service raises subscription prices again",
        "Union and employers reach pay deal after long talks",
        "Toy maker expects bumper Christmas after strong autumn sales",
        "Pension fund sells its stake in the coal industry",
        "{company} reports first annual loss in its history",
        "Currency hits record low against the dollar",
        "Online bank reaches ten million customers",
        "Factory output shrinks for the fourth month in a row",
        "Brewery expands into Asian markets after years of growth",
        "Regulator blocks merger of two mobile networks",
        "Consumer spending picks up ahead of the holidays",
        "{company} plans to list its shares on the stock exchange",
        "Food delivery firm cuts fees to win back restaurants",
        "Economists expect growth to slow next year",
        "{company} profits double on strong demand in Asia",
        "Gold price reaches an all-time high",
        "Hotel group reports busy summer as tourism recovers",
        "{company} buys back 500 million of its own shares",
        "Tech giant fined for breaking competition rules",
        "Wage growth outpaces inflation for the first time in years",
        "Furniture chain collapses, putting 3,000 jobs at risk",
        "Electric car sales overtake diesel for the first time",
        "{company} warns of supply problems for spring",
        "Mortgage rates fall for the fifth week in a row",
        "Trade deficit widens as exports weaken",
        "Budget airline orders 100 new planes",
        "{company} boss gets 20 million pay package despite falling profits",
        "Farmland prices climb as investors look for safe assets",
    ],
    "politics": [
        "Prime minister calls early election for {month}",
        "Parliament votes to raise the minimum wage",
        "Opposition leader resigns after poor local election results",
        "{country} and its neighbour sign new border agreement",
        "Senate blocks bill to change voting rules",
        "Government announces new plan to cut hospital waiting lists",
        "President vetoes budget passed by the assembly",
        "Minister quits over expenses scandal",
        "Voters head to the polls in tight presidential race",
        "Coalition talks collapse as parties fail to agree on taxes",
        "New law bans phones in schools from September",
        "Foreign ministers meet to discuss the crisis in {country}",
        "Mayor wins second term with an increased majority",
        "Protesters gather outside parliament over pension reform",
        "Party unveils manifesto promising free childcare",
        "Court rules the new constituency map unlawful",
        "{country} recalls ambassador after diplomatic row",
        "Governor signs climate bill into law",
        "Finance minister presents budget with surprise tax cuts",
        "Referendum on independence set for next spring",
        "Cabinet reshuffle sees three ministers replaced",
        "Lawmakers approve extra funding for rural schools",
        "Election officials confirm record turnout among young voters",
        "Summit ends with pledge to cut emissions by half",
        "Party members choose new leader in close contest",
        "Government faces confidence vote after losing key bill",
        "Talks between {country} and the trade bloc stall again",
        "Interior minister promises more police on the streets",
        "Campaign spending rules tightened ahead of the vote",
        "Speaker suspends session after heated debate",
        "{country} holds first free elections in decades",
        "Health secretary under pressure over nurse shortages",
        "Council leader apologises for housing failures",
        "Polls show ruling party slipping behind the opposition",
        "New defence pact signed by five nations",
        "Senator announces run for the presidency",
        "Government U-turn on plans to close local courts",
        "Parliament passes law to protect whistleblowers",
        "Prime minister survives leadership challenge",
        "Voters reject plan to lower the voting age",
        "Government to hold inquiry into flood response",
        "{country} elects its first woman president",
        "Opposition demands answers over missing defence funds",
        "Election recount ordered in disputed district",
        "Ministers agree to raise spending on schools",
        "Parliament debates ban on second homes",
        "Newly elected mayor promises free bus travel",
        "Party leader sacks deputy after leaked emails",
        "Diplomats from {country} walk out of peace talks",
        "Bill to reform the upper house clears first vote",
        "Local elections see big gains for independent candidates",
        "Government announces ban on political donations from abroad",
    ],
}

NEWS_FILL = {
    "team": lambda r: r.choice(
        [
            "Riverton Rovers",
            "Ashford United",
            "Harbour City",
            "Northgate Athletic",
            "the Lakeside Lions",
            "Eastwood Town",
            "the Westport Wolves",
            "Kingsbridge FC",
        ]
    ),
    "company": lambda r: r.choice(
        [
            "Northwind Foods",
            "Brightline Motors",
            "Corvex Systems",
            "Halden Retail",
            "Pellmore Bank",
            "Ostra Energy",
            "Tarrow Airlines",
            "Quillon Pharma",
        ]
    ),
    "pct": lambda r: f"{r.randint(2, 18)}%",
    "country": lambda r: r.choice(
        ["Norway", "Chile", "Kenya", "Portugal", "Canada", "Vietnam", "Poland", "Ghana"]
    ),
    "month": lambda r: r.choice(["March", "May", "June", "September", "October", "November"]),
}
NEWS_FILL["team2"] = NEWS_FILL["team"]
NEWS_FILL["uni"] = lambda r: r.choice(
    [
        "Halden University",
        "Marwick Institute",
        "Eastbrook University",
        "the Corran Lab",
        "Southport University",
        "the Avel Institute",
    ]
)


# ------------------------------------------------------------------------------------------------
# assembly
# ------------------------------------------------------------------------------------------------

SLOT = re.compile(r"\{(\w+)\}")


def render(t: str, fill: dict, rng: random.Random) -> str:
    vals: dict[str, str] = {}
    for name in SLOT.findall(t):
        v = fill[name](rng)
        while name == "team2" and v == vals.get("team"):
            v = fill[name](rng)
        vals[name] = v
    s = t.format(**vals)
    return re.sub(r"\ba ([aeiou])", r"an \1", s)


def split_label(
    sources: list[str], label: str, n_train: int, n_eval: int, fill: dict, rng: random.Random
) -> tuple[list[dict], list[dict]]:
    """Split the written sentences of one label, then render rows from each side."""
    src = list(sources)
    rng.shuffle(src)
    k = n_eval  # each eval row comes from its own written sentence
    ev_src, tr_src = src[:k], src[k:]

    def fill_rows(pool: list[str], n: int) -> list[dict]:
        rows, seen, i, stale = [], set(), 0, 0
        while len(rows) < n:
            t = pool[i % len(pool)]
            i += 1
            s = render(t, fill, rng)
            if s in seen:
                stale += 1
                assert stale < 10 * len(pool), f"not enough sentences for {label}"
                continue
            seen.add(s)
            rows.append({"text": s, "label": label})
        return rows

    return fill_rows(tr_src, n_train), fill_rows(ev_src, n_eval)


def build_domain(
    spec: dict[str, list[str]], fill: dict, n_train: int, n_eval: int, rng: random.Random
) -> tuple[list[dict], list[dict]]:
    train, ev = [], []
    for label, sources in spec.items():
        tr, e = split_label(sources, label, n_train, n_eval, fill, rng)
        train += tr
        ev += e
    rng.shuffle(train)
    rng.shuffle(ev)
    return train, ev


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def words(s: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", s.lower()))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def check_pair(
    name: str,
    train_path: Path,
    eval_path: Path,
    labels: list[str],
    min_train: int,
    min_eval: int,
    max_sim: float = 0.6,
) -> float:
    def load(p: Path) -> list[dict]:
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
        for r in rows:
            assert set(r) == {"text", "label"}, r
            assert isinstance(r["text"], str) and r["text"].strip(), r
            assert r["label"] in labels, r
            assert 2 <= len(r["text"].split()) <= 45, r
        return rows

    tr, ev = load(train_path), load(eval_path)
    assert len(tr) >= min_train and len(ev) >= min_eval, (name, len(tr), len(ev))
    for rows in (tr, ev):
        c = Counter(r["label"] for r in rows)
        assert set(c) == set(labels) and max(c.values()) == min(c.values()), (name, c)
        assert len({r["text"] for r in rows}) == len(rows), f"duplicates in {name}"
    tt = {r["text"].lower() for r in tr}
    assert not any(r["text"].lower() in tt for r in ev), f"train/eval overlap in {name}"
    tw = [words(r["text"]) for r in tr]
    worst = max(jaccard(words(r["text"]), w) for r in ev for w in tw)
    assert worst < max_sim, f"near-duplicate between train and eval in {name}: {worst:.2f}"
    return worst


def main() -> None:
    rng = random.Random(SEED)

    # reviews: the written {item} templates and fixed sentences are split together
    item_fill = {"item": lambda r: r.choice(ITEMS)}
    train, ev = build_domain(
        {"positive": REVIEW_POS, "negative": REVIEW_NEG}, item_fill, 100, 30, rng
    )
    write_jsonl(HERE / "reviews" / "train.jsonl", train)
    write_jsonl(HERE / "reviews" / "eval.jsonl", ev)

    train, ev = build_domain(SUPPORT, SUPPORT_FILL, 45, 15, rng)
    write_jsonl(HERE / "support" / "train.jsonl", train)
    write_jsonl(HERE / "support" / "eval.jsonl", ev)

    train, ev = build_domain(NEWS, NEWS_FILL, 45, 15, rng)
    write_jsonl(HERE / "news" / "train.jsonl", train)
    write_jsonl(HERE / "news" / "eval.jsonl", ev)

    qt = [{"text": t, "label": "positive"} for t in QUALITY_TRAIN_POS]
    qt += [{"text": t, "label": "negative"} for t in QUALITY_TRAIN_NEG]
    rng.shuffle(qt)
    qh = [{"text": t, "label": lab} for t, lab in QUALITY_HELDOUT]
    rng.shuffle(qh)
    write_jsonl(HERE / "reviews" / "quality_train.jsonl", qt)
    write_jsonl(HERE / "reviews" / "quality_heldout.jsonl", qh)

    # ---- self-check -----------------------------------------------------------------------
    report = {}
    report["reviews"] = check_pair(
        "reviews",
        HERE / "reviews" / "train.jsonl",
        HERE / "reviews" / "eval.jsonl",
        ["positive", "negative"],
        150,
        50,
    )
    report["support"] = check_pair(
        "support",
        HERE / "support" / "train.jsonl",
        HERE / "support" / "eval.jsonl",
        ["billing", "shipping", "technical", "account"],
        150,
        50,
    )
    report["news"] = check_pair(
        "news",
        HERE / "news" / "train.jsonl",
        HERE / "news" / "eval.jsonl",
        ["sports", "science", "business", "politics"],
        150,
        50,
    )
    assert len(qt) == 50 and Counter(r["label"] for r in qt) == {"positive": 25, "negative": 25}
    assert len(qh) == 25
    hc = Counter(r["label"] for r in qh)
    assert abs(hc["positive"] - hc["negative"]) <= 1, hc
    all_texts = [
        json.loads(x)["text"].lower()
        for f in ("train", "eval")
        for x in (HERE / "reviews" / f"{f}.jsonl").read_text().splitlines()
    ]
    q_texts = [r["text"].lower() for r in qt]
    pool = set(all_texts) | set(q_texts)
    assert len(set(q_texts)) == 50 and not any(r["text"].lower() in pool for r in qh)
    assert not set(q_texts) & set(all_texts)
    qtw = [words(t) for t in q_texts]
    report["quality"] = max(jaccard(words(r["text"]), w) for r in qh for w in qtw)
    assert report["quality"] < 0.6, report["quality"]
    for k, v in report.items():
        print(f"{k}: ok (max train/eval word overlap {v:.2f})")


if __name__ == "__main__":
    main()
