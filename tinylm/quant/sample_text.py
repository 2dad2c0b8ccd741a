"""A fixed English sample for the quality gate: prose, facts, a recipe, a code snippet and a chat turn (written for
tinylm; kept in a module so it ships with the package)."""

QUALITY_SAMPLE = """\
The river town woke slowly that morning. Fishermen pulled their boats onto the gravel, the baker opened his shutters, and a thin fog lifted from the water as the sun climbed over the hills. Children ran along the quay with a dog that belonged to nobody in particular, and an old woman counted coins at the market stall where she sold apples, honey and small jars of plum jam.

Water boils at one hundred degrees Celsius at sea level, and it freezes at zero. The boiling point falls as altitude rises, because the air pressure above the liquid is lower. This is why cooking pasta on a high mountain takes longer than it does at the coast.

Paris is the capital of France, Berlin is the capital of Germany, and Madrid is the capital of Spain. Rome, the capital of Italy, was founded, according to legend, in 753 BC. London sits on the River Thames, while Vienna lies on the Danube.

To make a simple bread, mix five hundred grams of flour with ten grams of salt, seven grams of dried yeast and about three hundred and fifty millilitres of warm water. Knead the dough for ten minutes, let it rise for an hour, shape it, let it rise again, and bake it at two hundred and twenty degrees for thirty minutes.

A function that returns the sum of a list of numbers can be written in Python as follows:

def total(numbers):
    result = 0
    for value in numbers:
        result += value
    return result

print(total([1, 2, 3, 4]))

The output of this program is 10. A shorter version uses the built-in sum function, which does the same work in a single call.

Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, which contain the green pigment chlorophyll.

User: Can you suggest three names for a small black cat?
Assistant: Of course! How about Shadow, Pepper or Midnight? Each of them suits a curious little cat with dark fur.

In 1969, two astronauts walked on the Moon while a third orbited above them. The mission lasted eight days, and the crew returned safely to Earth, landing in the Pacific Ocean. Millions of people around the world watched the first steps on television.

The committee met on Tuesday to discuss the budget for the coming year. After a long debate, its members agreed to spend more on schools and roads, and less on new offices. The final report will be published next month, once the numbers have been checked again.
"""

# SmoothQuant's calibration text (tinylm/quant/smooth.py): other topics and words than QUALITY_SAMPLE, so the
# quality gate never scores the text the activation ranges were measured on.
CALIBRATION_SAMPLE = """\
Snow had closed the pass for three days, and the hut above the glacier was full. A guide from the valley mended a torn glove by the stove, two students argued about the best route to the summit, and a tired cook stirred a pot of lentil soup with smoked sausage.

Chemistry note: when sodium reacts with chlorine, each sodium atom gives one electron to a chlorine atom. The ions that form attract each other strongly, which is why table salt has such a high melting point, about 801 degrees.

function average(values) {
  if (values.length === 0) return null;
  const total = values.reduce((sum, v) => sum + v, 0);
  return total / values.length;
}

Q: Which is longer, the Nile or the Amazon?
A: Most sources give the Nile as slightly longer, at roughly 6,650 kilometres, though some measurements of the Amazon come out ahead.

The square of a sum is not the sum of the squares: (a + b)^2 = a^2 + 2ab + b^2. For a = 3 and b = 4 this gives 49, while 3^2 + 4^2 is only 25.

Quarterly report, Q3 2024: revenue 14.2 million (up 8%), operating costs 11.9 million, net margin 16.2%. Headcount rose from 212 to 236. Shipping delays in August cut sales in the northern region by roughly a tenth.

Dear Mr. Okafor, thank you for your letter of 12 May. I am sorry to hear that the parcel arrived damaged. We will send a replacement this week, free of charge, and you are welcome to keep the original.
"""
