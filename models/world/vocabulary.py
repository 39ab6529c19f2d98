"""Names and field statistics the automotive world draws from: makes and models, brands,
part types with their prices and fitment classes, colours, and the parts of e-mail addresses."""
from __future__ import annotations

from typing import Tuple

CURRENT_MODEL_YEAR = 2026

# Makes in popularity order for a performance-parts shop, each with models in popularity order.
MAKES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Ford", ("Mustang", "F-150", "Focus", "Fiesta", "Ranger", "Bronco", "Explorer", "Fusion",
              "Escape", "Taurus", "Crown Victoria", "Super Duty")),
    ("Chevrolet", ("Camaro", "Corvette", "Silverado 1500", "Impala", "Malibu", "Cruze",
                   "Colorado", "Tahoe", "S-10", "Cobalt", "Monte Carlo", "Suburban")),
    ("Honda", ("Civic", "Accord", "S2000", "Prelude", "Integra", "CR-V", "Fit", "Element",
               "Odyssey", "Pilot", "Ridgeline", "Del Sol")),
    ("Toyota", ("Supra", "Tacoma", "Tundra", "Camry", "Corolla", "4Runner", "Celica", "MR2",
                "GR86", "Land Cruiser", "RAV4", "Prius")),
    ("Subaru", ("WRX", "WRX STI", "BRZ", "Impreza", "Legacy", "Forester", "Outback",
                "Crosstrek")),
    ("Nissan", ("350Z", "370Z", "GT-R", "Altima", "Sentra", "240SX", "Frontier", "Titan",
                "Maxima", "Xterra", "Pathfinder", "Skyline")),
    ("Dodge", ("Challenger", "Charger", "Viper", "Durango", "Dart", "Neon", "Dakota", "Caliber")),
    ("Volkswagen", ("Golf GTI", "Golf R", "Jetta", "Passat", "Beetle", "Tiguan", "Corrado",
                    "Scirocco")),
    ("BMW", ("M3", "3 Series", "5 Series", "M5", "Z4", "1 Series", "X5", "M2")),
    ("Mazda", ("MX-5 Miata", "RX-7", "RX-8", "Mazda3", "Mazda6", "CX-5", "Protege")),
    ("Jeep", ("Wrangler", "Grand Cherokee", "Cherokee", "Gladiator", "Liberty", "Compass")),
    ("Ram", ("1500", "2500", "3500")),
    ("Mitsubishi", ("Lancer Evolution", "Eclipse", "3000GT", "Lancer", "Outlander")),
    ("Audi", ("A4", "S4", "RS4", "A3", "S3", "TT", "R8", "A6")),
    ("Hyundai", ("Genesis Coupe", "Veloster", "Elantra", "Sonata", "Tucson")),
    ("Acura", ("RSX", "TSX", "NSX", "Integra", "TL", "ILX")),
    ("Lexus", ("IS 300", "IS 350", "GS 300", "RC F", "LS 400", "SC 300")),
    ("Infiniti", ("G35", "G37", "Q50", "Q60", "FX35")),
    ("GMC", ("Sierra 1500", "Canyon", "Yukon", "Sonoma")),
    ("Pontiac", ("Firebird", "GTO", "G8", "Grand Prix", "Solstice")),
    ("Mercedes-Benz", ("C-Class", "E-Class", "C63 AMG", "SLK", "CLA", "G-Class")),
    ("Porsche", ("911", "Cayman", "Boxster", "Cayenne", "Macan")),
    ("Kia", ("Stinger", "Optima", "Forte", "Soul", "Sorento")),
    ("Cadillac", ("CTS-V", "ATS", "Escalade", "CTS")),
    ("Chrysler", ("300", "300C", "Crossfire", "PT Cruiser")),
    ("Mini", ("Cooper", "Cooper S", "Clubman", "Countryman")),
    ("Scion", ("FR-S", "tC", "xB")),
    ("Lincoln", ("Mark VIII", "LS", "Navigator", "Town Car")),
    ("Buick", ("Grand National", "Regal", "LaCrosse")),
    ("Volvo", ("240", "850", "S60", "V70", "XC90")),
    ("Tesla", ("Model 3", "Model S", "Model Y")),
    ("Genesis", ("G70", "G80")),
    ("Saab", ("9-3", "9-5", "900")),
    ("Fiat", ("500 Abarth", "124 Spider", "500")),
    ("Alfa Romeo", ("Giulia", "4C", "Stelvio")),
    ("Plymouth", ("Barracuda", "Road Runner", "Duster")),
    ("Land Rover", ("Defender", "Range Rover", "Discovery")),
    ("Jaguar", ("F-Type", "XF", "XJ")),
    ("Suzuki", ("Swift", "Samurai", "SX4", "Grand Vitara")),
    ("Lotus", ("Elise", "Exige", "Evora")),
)

# Fictional brands with their SKU codes (colour-variant groups are named code + number, e.g. RA003).
BRANDS: Tuple[Tuple[str, str], ...] = (
    ("RaceAxis", "RA"), ("Voltline", "VL"), ("Apex Forge", "AF"), ("Torque Theory", "TT"),
    ("Nitro Works", "NW"), ("Redline Supply", "RS"), ("Carbon Kinetic", "CK"),
    ("Boost Labs", "BL"), ("Gridline", "GL"), ("Ironclad Garage", "IG"),
    ("Velocity Dynamics", "VD"), ("Track Ready", "TR"), ("Hotrod House", "HH"),
    ("Streetline", "SL"), ("Piston Peak", "PP"), ("Turbo Tribe", "TB"), ("Shift Science", "SS"),
    ("Pro Stance", "PS"), ("Drift Dept", "DD"), ("Octane Outfitters", "OO"),
    ("Blue Flame", "BF"), ("Quarter Mile Co", "QM"), ("Pit Lane", "PL"), ("Motive Parts", "MP"),
    ("Lumen Auto", "LA"), ("Stopping Power", "SP"), ("Coolflow", "CF"), ("Sparkwell", "SW"),
    ("Fuel First", "FF"), ("Gearhead Goods", "GG"), ("Northshore Tuning", "NT"),
    ("Autobahn Alloy", "AA"), ("Canyon Carve", "CC"), ("Desert Run", "DR"),
    ("Eastbound Engineering", "EE"), ("Heel Toe", "HT"), ("Monarch Moto", "MM"),
    ("Westcoast Wrench", "WW"), ("Zenith Performance", "ZP"), ("Garage Nine", "GN"),
)

# Base-product classes: how a product relates to fitment.
SPECIFIC, MAKE_BROAD, FIT_MISSING, UNIVERSAL_BROAD, UNIVERSAL, SERVICE = range(6)
CLASS_NAMES = ("specific", "make_broad", "fit_missing", "universal_broad", "universal", "service")

# Part types: name, SKU code, median price, log-sd, colour-variant capable, and relative
# frequency within each class (specific, make_broad, fit_missing, universal_broad, universal).
PART_TYPES: Tuple[Tuple, ...] = (
    ("Headlight", "HL", 320, 0.50, True, (6, 0, 2, 5, 0)),
    ("Tail Light", "TL", 240, 0.50, True, (4, 0, 1, 0, 0)),
    ("Intake", "INT", 330, 0.40, False, (6, 0, 3, 0, 0)),
    ("Exhaust", "EXH", 950, 0.50, False, (7, 0, 3, 0, 0)),
    ("Coilover", "CO", 1350, 0.40, False, (5, 0, 2, 0, 0)),
    ("Brake Kit", "BRK", 1150, 0.55, False, (5, 1, 2, 0, 0)),
    ("Turbo", "TRB", 1950, 0.45, False, (3, 0, 2, 0, 0)),
    ("Intercooler", "IC", 780, 0.40, False, (3, 0, 1, 0, 0)),
    ("Clutch Kit", "CLU", 640, 0.40, False, (4, 0, 1, 0, 0)),
    ("Console Latch", "LATCH", 38, 0.35, False, (4, 0, 1, 0, 0)),
    ("Ignition Coil", "IGN-COIL", 80, 0.45, False, (2, 6, 1, 0, 0)),
    ("Spark Plug", "SPK", 14, 0.40, False, (1, 5, 1, 2, 0)),
    ("Wheel", "WHL", 420, 0.50, True, (3, 3, 2, 3, 0)),
    ("Sway Bar", "SWAY", 290, 0.40, False, (3, 0, 1, 0, 0)),
    ("Radiator", "RAD", 430, 0.45, False, (3, 1, 1, 0, 0)),
    ("Fuel Pump", "FP", 270, 0.50, False, (2, 3, 1, 0, 0)),
    ("Lowering Springs", "SPR", 310, 0.35, False, (3, 0, 1, 0, 0)),
    ("Brake Pads", "PAD", 85, 0.45, False, (3, 4, 1, 0, 0)),
    ("Grille", "GRL", 260, 0.50, True, (3, 0, 1, 0, 0)),
    ("Mirror", "MIR", 160, 0.50, True, (2, 0, 1, 0, 0)),
    ("Door Handle", "DH", 45, 0.40, True, (2, 0, 1, 0, 0)),
    ("Seat", "SEAT", 900, 0.50, True, (1, 0, 1, 3, 0)),
    ("Steering Wheel", "STW", 340, 0.45, True, (1, 0, 1, 3, 0)),
    ("Floor Mats", "MAT", 95, 0.40, True, (2, 0, 1, 3, 0)),
    ("Performance Tuner", "TUNE", 680, 0.30, False, (2, 2, 6, 0, 0)),
    ("Engine Bolt Kit", "EBK", 110, 0.40, False, (2, 2, 1, 0, 0)),
    ("Distributor Cap", "DCAP", 55, 0.35, False, (1, 3, 1, 0, 0)),
    ("Gasket", "GSK", 18, 0.50, False, (4, 1, 1, 0, 0)),
    ("Bolt Set", "BOLT", 22, 0.40, False, (2, 1, 1, 0, 0)),
    ("Wiper Blade", "WIPER", 24, 0.30, False, (0, 0, 0, 4, 2)),
    ("Gauge", "GAUGE", 190, 0.50, False, (0, 0, 0, 2, 3)),
    ("Motor Oil", "OIL", 38, 0.35, False, (0, 0, 0, 0, 6)),
    ("Coolant", "CLNT", 24, 0.30, False, (0, 0, 0, 0, 3)),
    ("Brake Fluid", "BFL", 16, 0.30, False, (0, 0, 0, 0, 2)),
    ("Tool Kit", "TOOL", 140, 0.70, False, (0, 0, 0, 0, 4)),
    ("Floor Jack", "JACK", 280, 0.50, False, (0, 0, 0, 0, 2)),
    ("T-Shirt", "TEE", 28, 0.25, True, (0, 0, 0, 0, 4)),
    ("Hat", "HAT", 26, 0.25, True, (0, 0, 0, 0, 3)),
    ("Detailing Kit", "DET", 60, 0.50, False, (0, 0, 0, 0, 3)),
    ("Shift Knob", "KNOB", 65, 0.45, True, (0, 0, 0, 0, 3)),
    ("Dash Camera", "DCAM", 190, 0.40, False, (0, 0, 0, 0, 2)),
    ("Car Cover", "COVER", 150, 0.40, True, (0, 0, 0, 0, 2)),
    ("Decal", "DEC", 9, 0.45, True, (0, 0, 0, 0, 3)),
    ("Clamp", "CLMP", 8, 0.40, False, (0, 0, 0, 0, 3)),
    ("Valve Stem Cap", "VSC", 7, 0.35, True, (0, 0, 0, 0, 2)),
)
SERVICE_TYPES: Tuple[Tuple[str, str, float, float], ...] = (
    ("Installation", "SVC-INSTALL", 190, 0.50), ("Labor", "SVC-LABOR", 120, 0.50),
    ("Dyno Tune", "SVC-DYNO", 560, 0.30),
)
LOW_VALUE_TYPES = ("Gasket", "Bolt Set", "Decal", "Clamp", "Valve Stem Cap")
LOW_VALUE_EXCEPTIONS = ("Engine Bolt Kit", "Distributor Cap")
PERFORMANCE_TYPES = frozenset({"Intake", "Exhaust", "Coilover", "Brake Kit", "Turbo",
                               "Intercooler", "Clutch Kit", "Sway Bar", "Lowering Springs",
                               "Performance Tuner"})
COLOURS = (("B", "Black"), ("R", "Red"), ("W", "White"), ("S", "Silver"))
UNIVERSAL_ADJECTIVES = ("Pro", "Classic", "Garage", "Track", "Everyday", "Premium")

FIRST_NAMES = ("james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda",
               "william", "elizabeth", "david", "barbara", "richard", "susan", "joseph", "jessica",
               "thomas", "sarah", "chris", "karen", "daniel", "nancy", "matt", "lisa", "tony",
               "betty", "mark", "sandra", "steve", "ashley", "paul", "kim", "andrew", "emily",
               "josh", "donna", "kevin", "michelle", "brian", "carol", "george", "amanda",
               "ed", "melissa", "ryan", "deb", "jacob", "laura", "gary", "rebecca", "nick",
               "sharon", "eric", "cynthia", "jon", "kathleen", "sam", "amy", "luis", "angela",
               "carlos", "maria", "jose", "ana", "wei", "mei", "raj", "priya", "kenji", "yuki")
LAST_NAMES = ("smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis",
              "rodriguez", "martinez", "hernandez", "lopez", "gonzalez", "wilson", "anderson",
              "thomas", "taylor", "moore", "jackson", "martin", "lee", "perez", "thompson",
              "white", "harris", "sanchez", "clark", "ramirez", "lewis", "robinson", "walker",
              "young", "allen", "king", "wright", "scott", "torres", "nguyen", "hill", "flores",
              "green", "adams", "nelson", "baker", "hall", "rivera", "campbell", "mitchell",
              "carter", "roberts", "chen", "patel", "kim", "tanaka", "singh", "murphy")
EMAIL_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com",
                 "aol.com", "comcast.net", "protonmail.com")
EMAIL_DOMAIN_P = (0.44, 0.16, 0.12, 0.10, 0.08, 0.04, 0.03, 0.03)
