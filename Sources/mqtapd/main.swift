import TapAPI
import TapCore
print("mqtapd")
